"""The chat page (llamaforge/serving/static/) in headless Chromium, against the "chain" model of test_api.py
(greedy answers are known exactly). Markdown rendering and injection attempts, conversations kept across a
reload, regenerate, edit, tokens/s, the API key prompt. Screenshots go to test-artifacts/."""
import json
import re
import shutil

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from conftest import needs_default_model  # noqa: E402
from test_api import ARTIFACTS, Server, chain, model_dir  # noqa: E402,F401 (model_dir: the chain model, a fixture)

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (BROWSER and DRIVER),
                                reason="chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")

MARKDOWN = """## Plan

Use **bold**, *italic*, ~~old~~ and `inline()` code; see [the docs](https://example.com/docs) or https://example.org.

1. first
2. second
   - nested

```python
print("<b>hi</b>")
```

> a quote

| name | size |
|:-----|-----:|
| a    | 1    |

snake_case_name stays, and 2 * 3 * 4 too."""

INJECTION = ("<img src=x onerror=\"window.pwned=1\"> <script>window.pwned=2</script> "
             "[click](javascript:window.pwned=3) <a href=\"javascript:alert(1)\">a</a> "
             "![pic](https://example.com/x.png) `<i>code</i>`")


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, slow=0.01)  # ~10 ms a token, so Stop has something to stop
    yield s
    s.close()


@pytest.fixture(scope="module")
def tail(server) -> int:
    """The last token of every chat prompt: chat answers chain from it."""
    return server.llm.chat_ids([{"role": "user", "content": "x"}])[-1]


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    opts = webdriver.ChromeOptions()
    opts.binary_location = BROWSER
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path_factory.mktemp('profile')}", "--window-size=1100,760"):
        opts.add_argument(flag)
    d = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
    d.set_page_load_timeout(20)
    yield d
    d.quit()


@pytest.fixture
def browser(chromium, server):
    """One Chromium for the module; each test starts on the page with nothing stored."""
    chromium.get(server.url + "/")
    chromium.execute_script("localStorage.clear(); sessionStorage.clear()")
    open_page(chromium, server)
    yield chromium


def open_page(d, server):
    d.get(server.url + "/")
    WebDriverWait(d, 20).until(lambda d: d.find_element(By.ID, "model").text == "chain")


def send(d, text, n_answers):
    """Type `text`, send it, wait for the n-th answer to finish."""
    d.find_element(By.ID, "prompt").send_keys(text)
    d.find_element(By.ID, "send").click()
    WebDriverWait(d, 20).until(lambda d: len(answers(d)) == n_answers and not d.find_elements(By.CSS_SELECTOR, ".streaming")
                               and d.find_element(By.ID, "send").is_enabled())


def texts(d, css):
    """The text of each element matching `css`, read in one go (the page re-renders a conversation when an answer ends)."""
    return d.execute_script("return Array.from(document.querySelectorAll(arguments[0]), (e) => e.innerText)", css)


def answers(d):
    return texts(d, ".msg.assistant")


def stored(d):
    return json.loads(d.execute_script("return localStorage.getItem('llamaforge.chats.v1')") or "[]")


def set_max_tokens(d, n):
    if not d.find_element(By.ID, "max-tokens").is_displayed():
        d.find_element(By.CSS_SELECTOR, "details summary").click()
    box = d.find_element(By.ID, "max-tokens")
    box.clear()
    if n:
        box.send_keys(str(n))


def screenshot(d, name):
    ARTIFACTS.mkdir(exist_ok=True)
    d.save_screenshot(str(ARTIFACTS / name))
    assert (ARTIFACTS / name).stat().st_size > 1000


def test_streams_stops_and_shows_tokens_per_second(server, tail, browser):
    d = browser
    set_max_tokens(d, 24)
    send(d, "<img src=x onerror=alert(1)> What is the capital of France?", 1)
    assert answers(d) == [chain(tail, 24)]  # streamed, complete
    user = d.find_element(By.CSS_SELECTOR, ".msg.user")
    assert user.text.startswith("<img src=x") and not d.find_elements(By.CSS_SELECTOR, "#log img")  # text, not HTML
    status = d.find_element(By.ID, "status").text
    assert re.fullmatch(r"24 tokens · [\d.]+ tokens/s · first token [\d.]+ s · stopped at max tokens", status), status
    assert d.find_element(By.CSS_SELECTOR, ".turn.assistant .stats").text == status
    # a second turn (the history goes with it) without a token limit: Stop ends it mid-stream
    set_max_tokens(d, None)
    d.find_element(By.ID, "prompt").send_keys("And Italy?")
    d.find_element(By.ID, "send").click()
    WebDriverWait(d, 20).until(lambda d: len(answers(d)) == 2 and len(answers(d)[1]) >= 5)
    d.find_element(By.ID, "stop").click()
    WebDriverWait(d, 20).until(lambda d: d.find_element(By.ID, "status").text.startswith("stopped"))
    assert re.fullmatch(r"stopped · \d+ tokens · [\d.]+ tokens/s · first token [\d.]+ s", d.find_element(By.ID, "status").text)
    second = answers(d)[1]
    assert 5 <= len(second) < 150 and chain(tail, len(second)) == second
    assert server.wait_idle(3.0)  # the aborted fetch stopped the generation
    assert [m["content"] for m in stored(d)[0]["messages"]][1:] == [chain(tail, 24), "And Italy?", second]  # the stopped part is kept


def test_markdown_rendered_and_injection_shown_as_text(server, browser):
    d = browser
    conv = {"id": "md", "title": "Markdown", "updated": 1, "messages": [
        {"role": "user", "content": "Show me markdown. **not bold**"},
        {"role": "assistant", "content": MARKDOWN},
        {"role": "user", "content": "And HTML?"},
        {"role": "assistant", "content": INJECTION}]}
    d.execute_script("localStorage.setItem('llamaforge.chats.v1', arguments[0]); localStorage.setItem('llamaforge.current', 'md')",
                     json.dumps([conv]))
    open_page(d, server)
    first, second = d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
    q = lambda css: first.find_elements(By.CSS_SELECTOR, css)  # noqa: E731
    assert q("h2")[0].text == "Plan"
    assert [e.text for e in q("strong")] == ["bold"] and [e.text for e in q("em")] == ["italic"] and q("del")[0].text == "old"
    assert [e.text for e in q("p > code")] == ["inline()"]
    links = q("a")
    assert [(a.text, a.get_attribute("href")) for a in links] == [("the docs", "https://example.com/docs"),
                                                                   ("https://example.org", "https://example.org/")]
    assert all(a.get_attribute("rel") == "noopener noreferrer nofollow" and a.get_attribute("target") == "_blank" for a in links)
    assert [e.text for e in q("ol > li")][0] == "first" and q("ol > li ul > li")[0].text == "nested"
    assert q(".code-block .code-lang")[0].text == "python"
    assert q("pre code.language-python")[0].text == 'print("<b>hi</b>")' and not q("pre b")
    assert q("blockquote")[0].text == "a quote"
    assert [e.text for e in q("th")] == ["name", "size"] and [e.text for e in q("td")] == ["a", "1"]
    assert q("td")[1].value_of_css_property("text-align") == "right"
    assert "snake_case_name stays, and 2 * 3 * 4 too." in first.text
    assert d.find_elements(By.CSS_SELECTOR, ".msg.user")[0].text == "Show me markdown. **not bold**"  # the user's text as typed
    # the injection: every tag is text; the only link is the image's, to https
    assert not second.find_elements(By.CSS_SELECTOR, "img, script, i, b")
    assert "<img src=x onerror=" in second.text and "<script>window.pwned=2</script>" in second.text and "<i>code</i>" in second.text
    assert [a.get_attribute("href") for a in second.find_elements(By.CSS_SELECTOR, "a")] == ["https://example.com/x.png"]
    assert "[click](javascript:window.pwned=3)" in second.text
    assert d.execute_script("return window.pwned") is None
    assert not d.find_elements(By.CSS_SELECTOR, "#log img, #log script, #log iframe")
    # a code block's Copy button puts the code on the clipboard
    d.execute_cdp_cmd("Browser.grantPermissions", {"origin": server.url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    first.find_element(By.CSS_SELECTOR, ".copy-code").click()
    WebDriverWait(d, 5).until(lambda d: first.find_element(By.CSS_SELECTOR, ".copy-code").text == "Copied")
    assert d.execute_async_script("navigator.clipboard.readText().then(arguments[0], (e) => arguments[0]('error ' + e))") \
        == 'print("<b>hi</b>")'
    d.execute_script("document.getElementById('log').scrollTop = 0")
    screenshot(d, "chat-page-markdown.png")


def test_conversations_survive_reload_and_are_listed(server, tail, browser):
    d = browser
    set_max_tokens(d, 6)
    send(d, "First conversation", 1)
    send(d, "Its second question", 2)
    d.find_element(By.ID, "new-chat").click()
    assert not d.find_elements(By.CSS_SELECTOR, ".turn")
    send(d, "Second conversation", 1)
    d.refresh()
    WebDriverWait(d, 20).until(lambda d: d.find_element(By.ID, "model").text == "chain")
    # the open conversation and the list came back; the settings too
    assert texts(d, ".msg.user") == ["Second conversation"]
    assert answers(d) == [chain(tail, 6)]
    titles = texts(d, "#chat-list .open")
    assert titles == ["Second conversation", "First conversation"]  # newest first
    assert d.find_element(By.CSS_SELECTOR, "#chat-list li.current .open").text == "Second conversation"
    assert d.execute_script("return document.getElementById('max-tokens').value") == "6"
    d.find_elements(By.CSS_SELECTOR, "#chat-list .open")[1].click()
    assert texts(d, ".msg.user") == ["First conversation", "Its second question"]
    assert answers(d) == [chain(tail, 6)] * 2
    screenshot(d, "chat-page-list.png")
    # a turn continues the conversation it was opened from, then delete the other one
    send(d, "Third question", 3)
    assert len(stored(d)) == 2 and [len(c["messages"]) for c in sorted(stored(d), key=lambda c: c["title"])] == [6, 2]
    other = d.find_element(By.CSS_SELECTOR, "#chat-list li:not(.current)")
    ActionChains(d).move_to_element(other).click(other.find_element(By.CSS_SELECTOR, ".delete")).perform()  # shown on hover
    assert [c["title"] for c in stored(d)] == ["First conversation"]
    assert texts(d, "#chat-list .open") == ["First conversation"]


def test_narrow_screen_list_opens_and_closes(server, tail, browser):
    d = browser
    set_max_tokens(d, 3)
    send(d, "Earlier", 1)
    d.find_element(By.ID, "new-chat").click()
    d.set_window_size(420, 800)
    try:
        assert not d.find_element(By.ID, "sidebar").is_displayed()
        d.find_element(By.ID, "toggle-chats").click()
        assert d.find_element(By.ID, "sidebar").is_displayed()
        ActionChains(d).move_to_element_with_offset(d.find_element(By.ID, "log"), 190, 0).click().perform()  # the page beside it: closes
        assert not d.find_element(By.ID, "sidebar").is_displayed()
        d.find_element(By.ID, "toggle-chats").click()
        d.find_element(By.CSS_SELECTOR, "#chat-list .open").click()  # opening a conversation closes it too
        assert not d.find_element(By.ID, "sidebar").is_displayed() and answers(d) == [chain(tail, 3)]
    finally:
        d.set_window_size(1100, 760)


def test_regenerate_and_edit(server, tail, browser):
    d = browser
    set_max_tokens(d, 4)
    send(d, "Question one", 1)
    send(d, "Question two", 2)
    assert answers(d) == [chain(tail, 4)] * 2
    # only the last answer has Regenerate; it replaces that answer (here with a longer one: max tokens 9)
    regen = [b for b in d.find_elements(By.CSS_SELECTOR, ".turn.assistant .actions button") if b.text == "Regenerate"]
    assert len(regen) == 1
    set_max_tokens(d, 9)
    regen[0].click()
    WebDriverWait(d, 20).until(lambda d: answers(d) == [chain(tail, 4), chain(tail, 9)] and d.find_element(By.ID, "send").is_enabled())
    assert [m["content"] for m in stored(d)[0]["messages"]] == ["Question one", chain(tail, 4), "Question two", chain(tail, 9)]
    # Edit the first question: what followed it goes, the edited one is answered
    set_max_tokens(d, 5)
    d.find_elements(By.CSS_SELECTOR, ".turn.user .actions button")[0].click()
    box = d.find_element(By.CSS_SELECTOR, ".edit-box")
    assert box.get_attribute("value") == "Question one"
    box.clear()
    box.send_keys("Question one, edited")
    next(b for b in d.find_elements(By.CSS_SELECTOR, ".turn.user .actions button") if b.text == "Send").click()
    WebDriverWait(d, 20).until(lambda d: answers(d) == [chain(tail, 5)] and d.find_element(By.ID, "send").is_enabled())
    assert texts(d, ".msg.user") == ["Question one, edited"]
    assert [m["content"] for m in stored(d)[0]["messages"]] == ["Question one, edited", chain(tail, 5)]
    # Cancel leaves the message as it was
    d.find_elements(By.CSS_SELECTOR, ".turn.user .actions button")[0].click()
    d.find_element(By.CSS_SELECTOR, ".edit-box").send_keys(" more")
    next(b for b in d.find_elements(By.CSS_SELECTOR, ".turn.user .actions button") if b.text == "Cancel").click()
    assert texts(d, ".msg.user") == ["Question one, edited"]


def test_api_key_prompt(model_dir, tail, browser):
    s = Server(model_dir, api_key="s3cret")
    d = browser
    try:
        d.get(s.url + "/")
        wait = WebDriverWait(d, 20)
        wait.until(lambda d: d.find_element(By.ID, "key-prompt").is_displayed())
        assert "needs an API key" in d.find_element(By.ID, "key-message").text
        assert d.find_element(By.ID, "model").text == "(API key needed)"
        screenshot(d, "chat-page-api-key.png")
        d.find_element(By.ID, "prompt").send_keys("Early\n")  # sent before any key: the question waits in the box
        wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())
        assert d.find_element(By.ID, "prompt").get_attribute("value") == "Early"
        assert not d.find_elements(By.CSS_SELECTOR, ".msg") and d.find_element(By.ID, "key-prompt").is_displayed()
        d.find_element(By.ID, "prompt").clear()
        d.find_element(By.ID, "key-input").send_keys("wrong\n")
        wait.until(lambda d: "did not accept" in d.find_element(By.ID, "key-message").text)
        assert d.find_element(By.ID, "key-prompt").is_displayed()
        d.find_element(By.ID, "key-input").send_keys("s3cret\n")
        wait.until(lambda d: d.find_element(By.ID, "model").text == "chain")
        assert not d.find_element(By.ID, "key-prompt").is_displayed()
        set_max_tokens(d, 3)
        send(d, "Hello", 1)
        assert answers(d) == [chain(tail, 3)]
        # the key lasts for this tab (sessionStorage), not in localStorage unless asked
        assert d.execute_script("return [sessionStorage.getItem('llamaforge.api-key'), localStorage.getItem('llamaforge.api-key')]") \
            == ["s3cret", None]
        # a key that stops working mid-conversation: the prompt again, and the question back in the box
        d.execute_script("sessionStorage.setItem('llamaforge.api-key', 'revoked')")
        d.find_element(By.ID, "prompt").send_keys("Again")
        d.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_element(By.ID, "key-prompt").is_displayed() and d.find_element(By.ID, "send").is_enabled())
        assert d.find_element(By.ID, "prompt").get_attribute("value") == "Again" and len(answers(d)) == 1
        assert not d.find_elements(By.CSS_SELECTOR, ".msg.error")
    finally:
        s.close()


RENDER = "const box = document.createElement('div'); box.appendChild(Markdown.render(arguments[0])); return box.innerHTML"
CODE = '<div class="code-block"><div class="code-bar"><span class="code-lang">{}</span><button class="copy-code" type="button" ' \
       'title="copy this code">Copy</button></div><pre><code{}>{}</code></pre></div>'


@pytest.mark.parametrize("text, html", [
    ("***both*** and **a *b* c**", "<p><strong><em>both</em></strong> and <strong>a <em>b</em> c</strong></p>"),
    ("a\\*b\\* `x*y*` __u__ _e_ file_name_x", "<p>a*b* <code>x*y*</code> <strong>u</strong> <em>e</em> file_name_x</p>"),
    ("line one\nline two", "<p>line one<br>line two</p>"),
    ("[wiki](https://en.wikipedia.org/wiki/Foo_(bar)) [rel](/v1/models) [bad](data:text/html,x) [js](JavaScript:alert(1))",
     '<p><a href="https://en.wikipedia.org/wiki/Foo_(bar)" target="_blank" rel="noopener noreferrer nofollow">wiki</a> '
     '<a href="http://127.0.0.1:PORT/v1/models" target="_blank" rel="noopener noreferrer nofollow">rel</a> '
     "[bad](data:text/html,x) [js](JavaScript:alert(1))</p>"),
    ("```js\nlet a = '<b>';", CODE.format("js", ' class="language-js"', "let a = '&lt;b&gt;';")),  # still streaming: open fence
    ("~~~\n  x\n~~~\nafter", CODE.format("text", "", "  x") + "<p>after</p>"),
    ("- a\n- b\n\n3. c\n4. d", '<ul class="tight"><li><p>a</p></li><li><p>b</p></li></ul><ol start="3" class="tight"><li><p>c</p></li>'
                                '<li><p>d</p></li></ol>'),
    ("# T #\n---\n> q\n> > deeper", "<h1>T</h1><hr><blockquote><p>q</p><blockquote><p>deeper</p></blockquote></blockquote>"),
    ("<b>bold?</b> &amp; <!-- c -->", "<p>&lt;b&gt;bold?&lt;/b&gt; &amp;amp; &lt;!-- c --&gt;</p>"),
    ("Title\n=====\nSub\n---\n\n---", "<h1>Title</h1><h2>Sub</h2><hr>"),
    ("1. Run:\n   ```sh\n   ls\n   ```\n2. Done\n   * sub", '<ol class="tight"><li><p>Run:</p>' + CODE.format("sh", ' class="language-sh"', "ls")
     + '</li><li><p>Done</p><ul class="tight"><li><p>sub</p></li></ul></li></ol>'),
    ("a|b\n---\n\nx | y\n--|--\n1 | 2 \\| 3", "<h2>a|b</h2>" '<div class="table-wrap"><table><thead><tr><th>x</th><th>y</th></tr></thead>'
     "<tbody><tr><td>1</td><td>2 | 3</td></tr></tbody></table></div>"),
])
def test_markdown_renderer_cases(server, browser, text, html):
    assert browser.execute_script(RENDER, text) == html.replace("PORT", str(server.port))


def test_markdown_renderer_fuzz_makes_only_safe_elements(server, browser):
    """Random mixes of markdown and HTML pieces: only the renderer's own elements and attributes come out, links are
    http(s)/mailto only, no handler runs, and the text of a plain-text input survives whole."""
    bad = browser.execute_script("""
        const pieces = ["<", ">", "*", "**", "_", "`", "```", "~~", "[", "](", ")", "![", "#", "|", "-", "\\n", "\\n\\n", " ", "  ",
                        "a", "1. ", "- ", "> ", "\\\\", "javascript:", "https://x.y/", "mailto:a@b.c", "data:text/html,",
                        "<img src=x onerror=window.pwned=1>", "<script>window.pwned=2</script>", "<a href=javascript:1>",
                        "&lt;", "&#60;", "\\"", "'", " onerror=", "|---|", ":", "\\t"];
        const tags = new Set(["P", "BR", "STRONG", "EM", "DEL", "CODE", "A", "H1", "H2", "H3", "H4", "H5", "H6", "UL", "OL", "LI",
                              "BLOCKQUOTE", "HR", "DIV", "SPAN", "BUTTON", "PRE", "TABLE", "THEAD", "TBODY", "TR", "TH", "TD"]);
        const attrs = new Set(["class", "href", "target", "rel", "type", "title", "start", "style"]);
        let seed = 12345;
        const rnd = (n) => { seed = (seed * 1103515245 + 12345) % 2147483648; return Math.floor(seed / 2147483648 * n); };
        for (let k = 0; k < 3000; k++) {
          let s = "";
          for (let j = rnd(60) + 1; j > 0; j--) s += pieces[rnd(pieces.length)];
          const box = document.createElement("div");
          box.appendChild(Markdown.render(s));
          for (const e of box.querySelectorAll("*")) {
            if (!tags.has(e.tagName)) return ["tag " + e.tagName, s];
            for (const a of e.attributes) if (!attrs.has(a.name)) return ["attribute " + a.name, s];
            if (e.tagName === "A" && !/^(https?:|mailto:)/.test(e.href)) return ["href " + e.href, s];
            if (e.hasAttribute("style") && !/^text-align: (left|right|center);$/.test(e.getAttribute("style"))) return ["style", s];
          }
        }
        const plain = "no markup here, just words and numbers 12 + 3 = 15; done";
        const box = document.createElement("div");
        box.appendChild(Markdown.render(plain));
        if (box.textContent !== plain) return ["plain text changed", box.textContent];
        for (const c of ["*", "_", "`", "[", "~", "<", "|", "#", "\\\\"]) Markdown.render(c.repeat(5000));  // no blow-up
        return window.pwned === undefined ? null : ["handler ran", String(window.pwned)];
    """)
    assert bad is None, bad


@pytest.mark.slow
@needs_default_model
def test_default_model_answer_renders(chromium):
    """The default model, greedy, asked for code: its streamed answer's fenced block becomes a code block with that code."""
    import llamaforge
    s = Server(llamaforge.load(llamaforge.DEFAULT_MODEL), name="smollm2-135m-instruct")
    d = chromium
    try:
        d.get(s.url + "/")
        WebDriverWait(d, 30).until(lambda d: d.find_element(By.ID, "model").text == "smollm2-135m-instruct")
        set_max_tokens(d, 120)
        d.find_element(By.ID, "prompt").send_keys("Write a Python function that reverses a string.")
        d.find_element(By.ID, "send").click()
        WebDriverWait(d, 300).until(lambda d: answers(d) and d.find_element(By.ID, "send").is_enabled())
        text = stored(d)[0]["messages"][1]["content"]
        assert re.search(r"\d+ tokens · [\d.]+ tokens/s", d.find_element(By.ID, "status").text)
        fences = re.findall(r"```(\w*)\n(.*?)\n```", text, re.S)
        assert fences, text  # the model writes its code fenced (greedy: the same answer each run)
        assert texts(d, ".msg.assistant pre code") == [code for _, code in fences]
        assert texts(d, ".msg.assistant .code-lang") == [lang or "text" for lang, _ in fences]
        screenshot(d, "chat-page.png")
    finally:
        s.close()
