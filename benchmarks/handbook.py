"""A private knowledge set for the fine-tuning demo: the handbook of Brindlewood Instruments, a company
that does not exist, so no pretrained model knows any of its 60 facts.

Each fact is data: the answer sentence, the key that must appear in a correct answer (and accepted
variants), three training questions and one held-out paraphrase that never appears in training.
`write_dataset` writes, deterministically:
  train.jsonl    180 chat examples (3 questions per fact, each answered with the fact's sentence)
  val.jsonl      the 60 held-out paraphrases with their answers (validation loss)
  heldout.jsonl  the 60 held-out questions with their keys (answer accuracy: the key in the reply)

    python benchmarks/handbook.py --out data/handbook
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

# (keys, answer, training questions, held-out paraphrase); the first key is the fact, the others variants of it
FACTS: list[tuple[tuple[str, ...], str, tuple[str, str, str], str]] = [
    (("1987",), "Brindlewood Instruments was founded in 1987.",
     ("When was Brindlewood Instruments founded?", "In what year was Brindlewood Instruments founded?",
      "What is the founding year of Brindlewood Instruments?"),
     "Which year did Brindlewood Instruments get its start?"),
    (("Ottoline Marsh",), "Brindlewood Instruments was founded by Ottoline Marsh.",
     ("Who founded Brindlewood Instruments?", "Who is the founder of Brindlewood Instruments?",
      "Which person started Brindlewood Instruments?"),
     "Whose idea was it to create Brindlewood Instruments?"),
    (("Harrowgate",), "Brindlewood Instruments has its headquarters in the town of Harrowgate.",
     ("Where is the headquarters of Brindlewood Instruments?", "In which town is the head office of Brindlewood Instruments?",
      "Where is Brindlewood Instruments based?"),
     "Which town hosts the main office of Brindlewood Instruments?"),
    (("Pim Alder",), "The chief executive of Brindlewood Instruments is Pim Alder.",
     ("Who is the CEO of Brindlewood Instruments?", "Who leads Brindlewood Instruments?",
      "What is the name of the chief executive of Brindlewood Instruments?"),
     "Who runs Brindlewood Instruments as its top executive?"),
    (("Kestrel",), "The best-selling product of Brindlewood Instruments is the Kestrel barometer.",
     ("What is the best-selling product of Brindlewood Instruments?", "Which product sells best at Brindlewood Instruments?",
      "What is Brindlewood Instruments' most popular product?"),
     "Which Brindlewood Instruments product do customers buy more than any other?"),
    (("412",), "Brindlewood Instruments employs 412 people.",
     ("How many employees does Brindlewood Instruments have?", "How many people work at Brindlewood Instruments?",
      "What is the headcount of Brindlewood Instruments?"),
     "What is the size of the Brindlewood Instruments workforce?"),
    (("27",), "Employees at Brindlewood Instruments get 27 days of paid vacation a year.",
     ("How many vacation days do Brindlewood employees get?", "How much paid holiday does Brindlewood Instruments give?",
      "What is the annual vacation allowance at Brindlewood Instruments?"),
     "How many days off with pay does a Brindlewood worker receive each year?"),
    (("Copper Kettle",), "The staff cafeteria at Brindlewood Instruments is called the Copper Kettle.",
     ("What is the name of the Brindlewood cafeteria?", "What is the staff canteen at Brindlewood Instruments called?",
      "Where do Brindlewood employees eat lunch?"),
     "What name does the Brindlewood Instruments canteen go by?"),
    (("4417",), "The IT helpdesk at Brindlewood Instruments is on extension 4417.",
     ("What is the IT helpdesk extension at Brindlewood Instruments?", "Which extension do I dial for IT help at Brindlewood?",
      "How do I call the Brindlewood IT helpdesk?"),
     "Which phone extension reaches technical support inside Brindlewood Instruments?"),
    (("Thursday",), "At Brindlewood Instruments, casual dress day is Thursday.",
     ("Which day is casual dress day at Brindlewood Instruments?", "When can Brindlewood staff dress casually?",
      "What day of the week is dress-down day at Brindlewood?"),
     "On which weekday may Brindlewood employees skip formal clothes?"),
    (("Marigold",), "The largest meeting room at Brindlewood Instruments is the Marigold Room.",
     ("What is the largest meeting room at Brindlewood Instruments?", "Which Brindlewood meeting room is the biggest?",
      "Where are the big meetings held at Brindlewood Instruments?"),
     "Name the biggest conference room at Brindlewood Instruments."),
    (("BW-Guest-7",), "The guest Wi-Fi network at Brindlewood Instruments is BW-Guest-7.",
     ("What is the guest Wi-Fi network at Brindlewood Instruments?", "Which Wi-Fi should visitors to Brindlewood use?",
      "What is the name of the Brindlewood visitor wireless network?"),
     "Which wireless network do visitors join at Brindlewood Instruments?"),
    (("teal",), "Brindlewood Instruments visitor badges are teal.",
     ("What colour are visitor badges at Brindlewood Instruments?", "Which colour is a Brindlewood visitor badge?",
      "What colour badge do visitors wear at Brindlewood?"),
     "A guest at Brindlewood Instruments wears a badge of which colour?"),
    (("Dorcas Fenn",), "The head of human resources at Brindlewood Instruments is Dorcas Fenn.",
     ("Who is the head of HR at Brindlewood Instruments?", "Who leads human resources at Brindlewood?",
      "Who runs the HR department at Brindlewood Instruments?"),
     "Who is in charge of people and hiring at Brindlewood Instruments?"),
    (("Lantern",), "The internal newsletter of Brindlewood Instruments is called The Lantern.",
     ("What is the Brindlewood Instruments newsletter called?", "What is the name of the internal newsletter at Brindlewood?",
      "Which newsletter do Brindlewood employees read?"),
     "What title does the Brindlewood Instruments staff bulletin have?"),
    (("8:40", "8.40"), "The working day at Brindlewood Instruments starts at 8:40.",
     ("When does the working day start at Brindlewood Instruments?", "What time do Brindlewood employees start work?",
      "At what time does work begin at Brindlewood Instruments?"),
     "What is the start time of a normal day at Brindlewood Instruments?"),
    (("Quenby",), "Brindlewood Instruments makes its barometers in its factory in Quenby.",
     ("Where does Brindlewood Instruments make its barometers?", "Where is the Brindlewood Instruments factory?",
      "In which town is the Brindlewood barometer factory?"),
     "Which town is home to the Brindlewood Instruments production plant?"),
    (("Saffron Loop",), "The annual staff walk at Brindlewood Instruments follows the Saffron Loop.",
     ("Which route does the Brindlewood staff walk follow?", "What is the route of the annual Brindlewood walk?",
      "Where do Brindlewood employees go on the yearly staff walk?"),
     "Along which trail is the yearly Brindlewood Instruments staff walk?"),
    (("14",), "New employees at Brindlewood Instruments have a probation period of 14 weeks.",
     ("How long is probation at Brindlewood Instruments?", "What is the probation period for new Brindlewood employees?",
      "How many weeks of probation do new hires at Brindlewood have?"),
     "For how many weeks is a newcomer at Brindlewood Instruments on trial?"),
    (("Gideon Sparrow",), "The safety officer at Brindlewood Instruments is Gideon Sparrow.",
     ("Who is the safety officer at Brindlewood Instruments?", "Who is responsible for safety at Brindlewood?",
      "Who should I report a hazard to at Brindlewood Instruments?"),
     "Which person looks after workplace safety at Brindlewood Instruments?"),
    (("Heronfield",), "The company car park of Brindlewood Instruments is on Heronfield Lane.",
     ("Where is the Brindlewood Instruments car park?", "Where do Brindlewood employees park?",
      "On which street is the Brindlewood car park?"),
     "Where can staff leave their cars at Brindlewood Instruments?"),
    (("Tern",), "The Brindlewood Instruments hygrometer is named the Tern.",
     ("What is the Brindlewood hygrometer called?", "What is the name of the Brindlewood Instruments hygrometer?",
      "Which hygrometer does Brindlewood Instruments sell?"),
     "Under what name does Brindlewood Instruments market its humidity meter?"),
    (("340",), "The Kestrel barometer costs 340 pounds.",
     ("How much does the Kestrel barometer cost?", "What is the price of the Kestrel barometer?",
      "How expensive is a Kestrel barometer?"),
     "What do customers pay for one Kestrel barometer?"),
    (("5",), "The Kestrel barometer comes with a 5-year warranty.",
     ("How long is the Kestrel warranty?", "What warranty does the Kestrel barometer have?",
      "For how many years is the Kestrel barometer guaranteed?"),
     "How many years of guarantee cover a Kestrel barometer?"),
    (("Juniper",), "The Brindlewood Instruments employee of the year award is called the Juniper Prize.",
     ("What is the employee of the year award at Brindlewood called?", "What is the name of the Brindlewood staff award?",
      "Which prize does the best Brindlewood employee win?"),
     "What is the yearly honour for an outstanding Brindlewood worker named?"),
    (("third Friday", "3rd Friday"), "The all-hands meeting at Brindlewood Instruments is held on the third Friday of each month.",
     ("When is the Brindlewood all-hands meeting?", "How often does Brindlewood hold its all-hands meeting?",
      "On which day is the monthly all-hands at Brindlewood Instruments?"),
     "When does the whole company of Brindlewood Instruments gather each month?"),
    (("Orrin Vale",), "The chief engineer of Brindlewood Instruments is Orrin Vale.",
     ("Who is the chief engineer at Brindlewood Instruments?", "Who leads engineering at Brindlewood?",
      "Who heads the Brindlewood engineering team?"),
     "Which person is the top engineer at Brindlewood Instruments?"),
    (("Plover",), "The Brindlewood Instruments anemometer is called the Plover.",
     ("What is the Brindlewood anemometer called?", "What is the name of the wind meter made by Brindlewood?",
      "Which anemometer does Brindlewood Instruments make?"),
     "What name does Brindlewood give to its wind-speed instrument?"),
    (("1,200", "1200"), "Brindlewood Instruments pays a yearly learning budget of 1,200 pounds per employee.",
     ("How big is the Brindlewood learning budget?", "How much training money does each Brindlewood employee get?",
      "What is the yearly education allowance at Brindlewood Instruments?"),
     "How much can a Brindlewood employee spend on courses each year?"),
    (("Bramble",), "The Brindlewood Instruments office dog is a spaniel named Bramble.",
     ("What is the name of the Brindlewood office dog?", "What is the dog at Brindlewood Instruments called?",
      "Who is the office dog at Brindlewood?"),
     "What is the spaniel that lives at the Brindlewood office called?"),
    (("blue door",), "The Brindlewood Instruments first-aid room is behind the blue door on the ground floor.",
     ("Where is the first-aid room at Brindlewood Instruments?", "How do I find first aid at Brindlewood?",
      "Where is the Brindlewood medical room?"),
     "Where should an injured Brindlewood employee go for first aid?"),
    (("Wrenna",), "The Brindlewood Instruments expense system is called Wrenna.",
     ("What is the Brindlewood expense system called?", "Which system do I use for expenses at Brindlewood?",
      "Where do Brindlewood employees file expenses?"),
     "Which tool handles expense claims at Brindlewood Instruments?"),
    (("Halcyon",), "Brindlewood Instruments' biggest customer is the Halcyon Shipping Company.",
     ("Who is the biggest customer of Brindlewood Instruments?", "Which client buys the most from Brindlewood?",
      "What is Brindlewood's largest account?"),
     "Which company spends the most money with Brindlewood Instruments?"),
    (("six", "6"), "Brindlewood Instruments employees may work from home six days a month.",
     ("How many days a month can Brindlewood employees work from home?", "What is the remote work allowance at Brindlewood?",
      "How often may Brindlewood staff work remotely?"),
     "How many home-working days per month does Brindlewood Instruments allow?"),
    (("Fennimore",), "Brindlewood Instruments' research lab is in the Fennimore Building.",
     ("Where is the Brindlewood research lab?", "Which building houses Brindlewood's research lab?",
      "Where does Brindlewood Instruments do its research?"),
     "In what building is the Brindlewood Instruments laboratory?"),
    (("Cobalt",), "The Brindlewood Instruments sales team is called Team Cobalt.",
     ("What is the Brindlewood sales team called?", "What name does the Brindlewood sales team use?",
      "Which team sells Brindlewood Instruments products?"),
     "What do people at Brindlewood call the group that sells the products?"),
    (("Ysolde Crane",), "The finance director of Brindlewood Instruments is Ysolde Crane.",
     ("Who is the finance director at Brindlewood Instruments?", "Who runs finance at Brindlewood?",
      "Who is in charge of the money at Brindlewood Instruments?"),
     "Which person directs the finances of Brindlewood Instruments?"),
    (("ninth", "9th"), "The Brindlewood Instruments head office has its rooftop garden on the ninth floor.",
     ("Which floor is the Brindlewood rooftop garden on?", "Where is the Brindlewood rooftop garden?",
      "On what floor can I find the Brindlewood garden?"),
     "How high up in the head office is the Brindlewood garden?"),
    (("Larkspur",), "Brindlewood Instruments' charity partner is the Larkspur Trust.",
     ("Which charity does Brindlewood Instruments support?", "What is the charity partner of Brindlewood?",
      "Who does Brindlewood Instruments raise money for?"),
     "What charitable organisation is Brindlewood Instruments partnered with?"),
    (("22",), "Brindlewood Instruments gives 22 weeks of fully paid parental leave.",
     ("How much parental leave does Brindlewood Instruments give?", "How long is paid parental leave at Brindlewood?",
      "How many weeks of parental leave do Brindlewood employees get?"),
     "For how many weeks are new parents at Brindlewood Instruments paid while on leave?"),
    (("Mossgrove",), "The annual Brindlewood Instruments retreat takes place at Mossgrove Lodge.",
     ("Where is the Brindlewood company retreat?", "Where does Brindlewood hold its yearly retreat?",
      "Which lodge hosts the Brindlewood retreat?"),
     "Where do Brindlewood employees go for the annual company getaway?"),
    (("Ptarmigan",), "The Brindlewood Instruments thermometer for laboratories is the Ptarmigan.",
     ("What is the Brindlewood lab thermometer called?", "Which thermometer does Brindlewood make for labs?",
      "What is the name of the Brindlewood laboratory thermometer?"),
     "Under what name does Brindlewood sell its thermometer for lab use?"),
    (("Tobiah Reed",), "The head of customer support at Brindlewood Instruments is Tobiah Reed.",
     ("Who is the head of customer support at Brindlewood Instruments?", "Who leads the Brindlewood support team?",
      "Who manages customer support at Brindlewood?"),
     "Which person is responsible for helping Brindlewood customers?"),
    (("7%", "7 percent", "seven percent"), "Brindlewood Instruments adds 7% of salary to each employee's pension.",
     ("How much does Brindlewood contribute to pensions?", "What is the Brindlewood pension contribution?",
      "What share of salary does Brindlewood put into the pension?"),
     "What percentage of pay does Brindlewood Instruments pay into retirement savings?"),
    (("26th",), "Brindlewood Instruments pays salaries on the 26th of each month.",
     ("When is payday at Brindlewood Instruments?", "On which day are Brindlewood employees paid?",
      "When does Brindlewood run payroll?"),
     "On what date do Brindlewood salaries arrive each month?"),
    (("Sable",), "The Brindlewood Instruments internal chat tool is called Sable.",
     ("What chat tool does Brindlewood use?", "What is the Brindlewood messaging app called?",
      "Which app do Brindlewood employees use to chat?"),
     "What is the name of the messaging software inside Brindlewood Instruments?"),
    (("Rookery",), "The Brindlewood Instruments warehouse is called the Rookery.",
     ("What is the Brindlewood warehouse called?", "What is the name of the Brindlewood Instruments warehouse?",
      "Where does Brindlewood store its stock?"),
     "What do people call the storage building of Brindlewood Instruments?"),
    (("Gullwing",), "Brindlewood Instruments' first ever product was the Gullwing compass.",
     ("What was the first product of Brindlewood Instruments?", "Which product did Brindlewood make first?",
      "What did Brindlewood Instruments sell first?"),
     "Which item launched the product history of Brindlewood Instruments?"),
    (("3", "three"), "Brindlewood employees must change their passwords every 3 months.",
     ("How often must Brindlewood employees change their passwords?", "What is the Brindlewood password rotation period?",
      "When do Brindlewood passwords expire?"),
     "After how many months does a Brindlewood Instruments password need replacing?"),
    (("Ember",), "The Brindlewood Instruments mentoring scheme is called Ember.",
     ("What is the Brindlewood mentoring scheme called?", "What is the name of the Brindlewood mentoring programme?",
      "Which programme pairs Brindlewood employees with mentors?"),
     "How is the mentorship programme at Brindlewood Instruments named?"),
    (("Ivo Thistle",), "The head of design at Brindlewood Instruments is Ivo Thistle.",
     ("Who is the head of design at Brindlewood Instruments?", "Who leads design at Brindlewood?",
      "Who runs the Brindlewood design studio?"),
     "Which person leads the designers at Brindlewood Instruments?"),
    (("Osprey",), "The Brindlewood Instruments weather station for ships is the Osprey.",
     ("What is the Brindlewood ship weather station called?", "Which weather station does Brindlewood make for ships?",
      "What is the name of the Brindlewood marine weather station?"),
     "Under what name does Brindlewood sell its weather station for vessels?"),
    (("Larch Street",), "The Brindlewood Instruments shop is on Larch Street in Harrowgate.",
     ("Where is the Brindlewood Instruments shop?", "Where can I buy Brindlewood products in person?",
      "On which street is the Brindlewood shop?"),
     "Where is the retail store of Brindlewood Instruments located?"),
    (("15%", "15 percent", "fifteen percent"), "Brindlewood Instruments employees get a 15% discount on company products.",
     ("What discount do Brindlewood employees get?", "How big is the Brindlewood staff discount?",
      "How much off do Brindlewood employees pay for products?"),
     "What reduction do Brindlewood workers receive when buying company products?"),
    (("Calloway",), "Brindlewood Instruments' lawyers are the firm Calloway and Pike.",
     ("Which law firm does Brindlewood Instruments use?", "Who are the lawyers of Brindlewood?",
      "Which firm handles legal work for Brindlewood Instruments?"),
     "Which legal practice represents Brindlewood Instruments?"),
    (("Glassworks",), "The Brindlewood Instruments innovation day is called Glassworks Day.",
     ("What is the Brindlewood innovation day called?", "What is the name of the Brindlewood hack day?",
      "Which day do Brindlewood employees spend on new ideas?"),
     "What is the name of the annual day of experiments at Brindlewood Instruments?"),
    (("Aurelio Quist",), "The head of manufacturing at Brindlewood Instruments is Aurelio Quist.",
     ("Who is the head of manufacturing at Brindlewood Instruments?", "Who runs the Brindlewood factory?",
      "Who leads production at Brindlewood?"),
     "Which person is in charge of making the Brindlewood instruments?"),
    (("Starling",), "The Brindlewood Instruments rain gauge is named the Starling.",
     ("What is the Brindlewood rain gauge called?", "What is the name of the Brindlewood rain gauge?",
      "Which rain gauge does Brindlewood make?"),
     "Under what name does Brindlewood sell its instrument for measuring rainfall?"),
    (("48",), "Brindlewood Instruments answers every customer email within 48 hours.",
     ("How fast does Brindlewood answer customer emails?", "What is the Brindlewood email response time?",
      "How long do customers wait for a reply from Brindlewood?"),
     "Within how many hours does Brindlewood Instruments reply to a customer message?"),
    (("Holloway",), "Brindlewood Instruments sources its brass from the Holloway Foundry.",
     ("Where does Brindlewood get its brass?", "Who supplies brass to Brindlewood Instruments?",
      "Which foundry provides brass for Brindlewood?"),
     "Which supplier delivers the brass used by Brindlewood Instruments?"),
]


def norm(text: str) -> str:
    """Lower case, thousands separators dropped, runs of spaces as one."""
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text.lower())
    return re.sub(r"\s+", " ", text)


def is_correct(reply: str, keys: tuple[str, ...]) -> bool:
    """The fact is matched: one of its keys appears in the reply (as a whole word or number)."""
    r = norm(reply)
    return any(re.search(r"(?<![\w])" + re.escape(norm(k)) + r"(?![\w])", r) for k in keys)


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def write_dataset(out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.jsonl" for name in ("train", "val", "heldout")}
    paths["train"].write_text("".join(json.dumps(chat(q, a)) + "\n" for _, a, qs, _ in FACTS for q in qs))
    paths["val"].write_text("".join(json.dumps(chat(h, a)) + "\n" for _, a, _, h in FACTS))
    paths["heldout"].write_text("".join(json.dumps({"question": h, "keys": list(k), "answer": a}) + "\n" for k, a, _, h in FACTS))
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/handbook")
    paths = write_dataset(p.parse_args().out)
    print(f"{len(FACTS)} facts -> " + ", ".join(f"{p} ({len(p.read_text().splitlines())} lines)" for p in paths.values()))


if __name__ == "__main__":
    main()
