// Markdown to DOM for the chat page, safe by construction: it builds elements with createElement and
// puts all text in with text nodes, so no string is ever parsed as HTML ("<img onerror=...>" in a
// model's answer stays text). Links keep only http(s) and mailto targets; images become links (the
// page's CSP loads none from elsewhere). It covers what chat models write: headings (# and underlined), paragraphs,
// lists (nested by indent, task boxes shown as text), block quotes, fenced code (with a Copy
// button), GFM tables, rules, and inline code, bold, italic, strikethrough, links and bare URLs.
// An unclosed code fence (an answer still streaming) runs to the end of the text.
"use strict";

const Markdown = (() => {
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };

  function safeUrl(url) {
    try {
      const u = new URL(url, document.baseURI);
      return ["http:", "https:", "mailto:"].includes(u.protocol) ? u.href : null;
    } catch (e) { return null; }
  }

  function link(parent, href, children) {
    const a = el("a");
    a.href = href;
    a.target = "_blank";
    a.rel = "noopener noreferrer nofollow";
    children(a);
    parent.appendChild(a);
  }

  // ---- inline ----
  const PUNCT = /[!-\/:-@\[-`{-~]/;
  const URL_RE = /^https?:\/\/[^\s<>]*[^\s<>.,;:!?'")\]]/;
  const LINK_RE = /^!?\[((?:[^\[\]\\]|\\.|\[[^\[\]]*\])*)\]\(\s*<?([^\s()<>]*(?:\([^\s()]*\)[^\s()<>]*)*)>?(?:\s+"[^"]*")?\s*\)/;
  const isWord = (c) => c !== undefined && /[\p{L}\p{N}]/u.test(c);

  // The closing delimiter of an emphasis run starting at `from`, or -1.
  function closer(s, delim, from) {
    for (let j = from; j <= s.length - delim.length; j++) {
      const c = s[j];
      if (c === "\\") { j++; continue; }
      if (c === "`") {  // code spans inside emphasis stay whole
        const end = s.indexOf("`", j + 1);
        if (end > 0) { j = end; continue; }
      }
      if (s.startsWith(delim, j) && !/\s/.test(s[j - 1])) {
        if (delim.length === 1 && s[j + 1] === delim) { j++; continue; }  // part of a longer run
        if (delim === "_" && isWord(s[j + 1])) continue;                   // snake_case stays text
        while (delim.length === 2 && s[j + 2] === delim[0]) j++;            // "***": the inner one closes first
        return j;
      }
    }
    return -1;
  }

  // Bold, italic or strikethrough opening at i: {delim, tag, end} or null.
  function emphasis(s, i) {
    for (const [delim, tag] of [["**", "strong"], ["__", "strong"], ["~~", "del"], ["*", "em"], ["_", "em"]]) {
      if (!s.startsWith(delim, i) || /\s/.test(s[i + delim.length] || " ")) continue;
      if (delim[0] === "_" && isWord(s[i - 1])) continue;
      const end = closer(s, delim, i + delim.length + 1);
      if (end >= 0) return { delim, tag, end };
    }
    return null;
  }

  function inline(s, parent) {
    let text = "";
    const flush = () => { if (text) { parent.appendChild(document.createTextNode(text)); text = ""; } };
    for (let i = 0; i < s.length;) {
      const c = s[i];
      if (c === "\\" && PUNCT.test(s[i + 1] || "")) { text += s[i + 1]; i += 2; continue; }
      if (c === "`") {
        const run = s.slice(i).match(/^`+/)[0];
        const end = s.indexOf(run, i + run.length);
        if (end > 0) {
          flush();
          let code = s.slice(i + run.length, end);
          if (/^ .*[^ ].* $/.test(code)) code = code.slice(1, -1);
          parent.appendChild(el("code", null, code));
          i = end + run.length;
          continue;
        }
        text += run; i += run.length; continue;
      }
      if (c === "[" || (c === "!" && s[i + 1] === "[")) {
        const m = s.slice(i, i + 2048).match(LINK_RE);
        const href = m && safeUrl(m[2]);
        if (href) {
          flush();
          link(parent, href, (a) => inline(m[1] || m[2], a));
          i += m[0].length;
          continue;
        }
      }
      if ((c === "h") && !isWord(s[i - 1])) {
        const m = s.slice(i, i + 2048).match(URL_RE);
        const href = m && safeUrl(m[0]);
        if (href) { flush(); link(parent, href, (a) => a.appendChild(document.createTextNode(m[0]))); i += m[0].length; continue; }
      }
      const run = emphasis(s, i);
      if (run) {
        flush();
        const e = el(run.tag);
        inline(s.slice(i + run.delim.length, run.end), e);
        parent.appendChild(e);
        i = run.end + run.delim.length;
        continue;
      }
      text += c;
      i += 1;
    }
    flush();
  }

  // Lines joined inside a paragraph: a line break where the text had one.
  function lines(ls, parent) {
    ls.forEach((l, k) => {
      if (k) parent.appendChild(el("br"));
      inline(l.replace(/^\s+/, "").replace(/\s+$/, ""), parent);
    });
  }

  // ---- blocks ----
  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
  const HEADING = /^ {0,3}(#{1,6})(?:\s+(.*?))?(?:\s+#+)?\s*$/;
  const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
  const QUOTE = /^ {0,3}> ?/;
  const SETEXT = /^ {0,3}(=+|-+)\s*$/;
  const ITEM = /^( {0,3})([-*+]|\d{1,9}[.)])(\s+|$)/;
  const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
  const blank = (l) => /^\s*$/.test(l);

  function cells(row) {
    let r = row.trim();
    if (r.startsWith("|")) r = r.slice(1);
    if (r.endsWith("|") && !r.endsWith("\\|")) r = r.slice(0, -1);
    const out = [];
    let cur = "";
    for (let i = 0; i < r.length; i++) {
      if (r[i] === "\\" && r[i + 1] === "|") { cur += "|"; i++; }
      else if (r[i] === "|") { out.push(cur.trim()); cur = ""; }
      else cur += r[i];
    }
    out.push(cur.trim());
    return out;
  }

  function codeBlock(parent, lang, code) {
    const box = el("div", "code-block");
    const bar = el("div", "code-bar");
    bar.appendChild(el("span", "code-lang", lang || "text"));
    const copy = el("button", "copy-code", "Copy");
    copy.type = "button";
    copy.title = "copy this code";
    bar.appendChild(copy);
    const pre = el("pre");
    const c = el("code", lang ? "language-" + lang.replace(/[^\w+#.-]/g, "") : null, code);
    pre.appendChild(c);
    box.append(bar, pre);
    parent.appendChild(box);
  }

  function table(parent, rows) {
    const head = cells(rows[0]);
    const align = cells(rows[1]).map((c) => (c.startsWith(":") && c.endsWith(":") ? "center" : c.endsWith(":") ? "right" : c.startsWith(":") ? "left" : ""));
    const wrap = el("div", "table-wrap");
    const t = el("table"), thead = el("thead"), tbody = el("tbody"), tr = el("tr");
    head.forEach((h, k) => { const th = el("th"); if (align[k]) th.style.textAlign = align[k]; inline(h, th); tr.appendChild(th); });
    thead.appendChild(tr);
    for (const row of rows.slice(2)) {
      const r = el("tr"), cs = cells(row);
      head.forEach((_, k) => { const td = el("td"); if (align[k]) td.style.textAlign = align[k]; inline(cs[k] || "", td); r.appendChild(td); });
      tbody.appendChild(r);
    }
    t.append(thead, tbody);
    wrap.appendChild(t);
    parent.appendChild(wrap);
  }

  function blocks(ls, parent) {
    let i = 0;
    while (i < ls.length) {
      const l = ls[i];
      if (blank(l)) { i++; continue; }
      let m;
      if ((m = l.match(FENCE))) {
        const fence = m[1], indent = l.match(/^ */)[0].length, body = [];
        i++;
        while (i < ls.length && !new RegExp("^ {0,3}" + fence[0] + "{" + fence.length + ",}\\s*$").test(ls[i])) {
          body.push(ls[i].replace(new RegExp("^ {0," + indent + "}"), ""));
          i++;
        }
        i++;  // the closing fence (or the end)
        codeBlock(parent, m[2], body.join("\n"));
        continue;
      }
      if ((m = l.match(HEADING))) {
        const h = el("h" + m[1].length);
        inline(m[2] || "", h);
        parent.appendChild(h);
        i++;
        continue;
      }
      if (RULE.test(l)) { parent.appendChild(el("hr")); i++; continue; }
      if (QUOTE.test(l)) {
        const body = [];
        while (i < ls.length && (QUOTE.test(ls[i]) || (!blank(ls[i]) && body.length && !blank(body[body.length - 1]) && !ITEM.test(ls[i]) && !FENCE.test(ls[i])))) {
          body.push(ls[i].replace(QUOTE, ""));
          i++;
        }
        const q = el("blockquote");
        blocks(body, q);
        parent.appendChild(q);
        continue;
      }
      if ((m = l.match(ITEM))) {
        i = list(ls, i, parent);
        continue;
      }
      if (l.includes("|") && i + 1 < ls.length && TABLE_SEP.test(ls[i + 1]) && cells(l).length === cells(ls[i + 1]).length) {
        const rows = [l, ls[i + 1]];
        i += 2;
        while (i < ls.length && !blank(ls[i]) && ls[i].includes("|")) rows.push(ls[i++]);
        table(parent, rows);
        continue;
      }
      const para = [];
      let level = 0;  // a setext heading: the paragraph underlined with === (h1) or --- (h2)
      while (i < ls.length && !blank(ls[i])) {
        if (para.length && (m = ls[i].match(SETEXT))) { level = m[1][0] === "=" ? 1 : 2; i++; break; }
        if (para.length && (FENCE.test(ls[i]) || HEADING.test(ls[i]) || RULE.test(ls[i]) || QUOTE.test(ls[i]) || ITEM.test(ls[i]))) break;
        para.push(ls[i++]);
      }
      const p = el(level ? "h" + level : "p");
      lines(para, p);
      parent.appendChild(p);
    }
  }

  // A list from line i: items with the same kind of marker; an item's lines are those indented past its marker.
  function list(ls, i, parent) {
    const first = ls[i].match(ITEM);
    const ordered = /\d/.test(first[2]);
    const L = el(ordered ? "ol" : "ul");
    if (ordered && parseInt(first[2], 10) !== 1) L.start = parseInt(first[2], 10);
    let loose = false;
    while (i < ls.length) {
      const m = ls[i].match(ITEM);
      if (!m || /\d/.test(m[2]) !== ordered) break;
      const width = m[1].length + m[2].length + Math.min(m[3].length || 1, 4);
      const body = [ls[i].slice(m[0].length)];
      i++;
      while (i < ls.length) {
        const l = ls[i];
        if (blank(l)) {
          const next = ls.slice(i).find((x) => !blank(x));
          if (next === undefined || next.match(/^ */)[0].length < width) break;
          body.push("");
          loose = true;
          i++;
          continue;
        }
        const ind = l.match(/^ */)[0].length;
        if (ind >= Math.min(width, 2)) { body.push(l.slice(Math.min(ind, width))); i++; continue; }
        if (ITEM.test(l) || FENCE.test(l) || HEADING.test(l) || RULE.test(l) || QUOTE.test(l) || blank(body[body.length - 1])) break;
        body.push(l);  // a lazy continuation line
        i++;
      }
      const li = el("li");
      blocks(body, li);
      L.appendChild(li);
      let j = i;  // items separated by blank lines stay one list
      while (j < ls.length && blank(ls[j])) j++;
      if (j > i && j < ls.length && ITEM.test(ls[j]) && /\d/.test(ls[j].match(ITEM)[2]) === ordered) { loose = true; i = j; }
    }
    if (!loose) L.classList.add("tight");
    parent.appendChild(L);
    return i;
  }

  // The DOM of `text` (a DocumentFragment).
  function render(text) {
    const frag = document.createDocumentFragment();
    blocks(String(text).replace(/\r\n?/g, "\n").replace(/\t/g, "    ").split("\n"), frag);
    return frag;
  }

  return { render };
})();
