"""Write qdpo_ray/prompts/train.jsonl: the 400 hand-written prompts, then ~2,100 composed ones.

    python scripts/make_train_prompts.py          # rewrite the file (deterministic: same seed, same bytes)
    python scripts/make_train_prompts.py --check  # exit 1 if the file differs from what this script writes

No network and no model: every composed prompt comes from the hand-written templates and pools below
(topics over many domains × request templates × optional constraints; numbers of math word problems and
puzzles from a seeded RNG). Candidates are de-duplicated (exact text and same content-word set), and
anything close to the held-out eval set is dropped: a shared word 8-gram, a content-word Jaccard ≥ 0.4
with an eval prompt, or a mention of an eval prompt's subject (`EVAL_SUBJECTS`). Near-copies of the
hand-written train prompts (Jaccard ≥ 0.6) are dropped too. Each kind then takes its quota round-robin
over its templates, so no template dominates.

Rows: {"id": "train-NNNN", "category": <one of eval's 10 categories>, "kind": <request form>, "prompt": ...}.
The first 400 rows (kind "handwritten") are kept verbatim and first, so `prompts.limit` ≤ 400 selects
exactly the old set; the composed rows follow in a seeded shuffle, so any prefix mixes all kinds.

Multi-turn follow-ups (kind "follow-up") are single prompts that quote or name the earlier exchange
("You suggested … Can you …"): the prompt format and the chat formatting (`data.chat_messages`) are
single-turn, so the earlier turn travels inside the user message.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "qdpo_ray" / "prompts" / "train.jsonl"
EVAL = ROOT / "qdpo_ray" / "prompts" / "eval.jsonl"
SEED = 20261201
KEEP = 400  # hand-written rows kept verbatim, first
MAX_CHARS = 400

# new rows per kind (the hand-written 400 come on top)
QUOTAS = {
    "explanation": 230, "list": 170, "advice": 120, "instruction": 200, "rewrite": 170,
    "math-word-problem": 200, "code": 190, "follow-up": 200, "creative": 150, "roleplay": 110,
    "reasoning": 130, "extraction": 120, "summarization": 120,
}
# most prompts one topic may get within a kind (a concept, a goal, a code task, a role and situation …)
TOPIC_CAPS = {"explanation": 1, "code": 3}

# ---------------------------------------------------------------------------------------------------
# Pools
# ---------------------------------------------------------------------------------------------------

NUM_WORDS = {3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 10: "ten"}

CONSTRAINTS = [
    "Keep it under 100 words.", "Use simple words a ten-year-old would understand.",
    "Answer in three bullet points.", "End with a one-sentence summary.", "Please avoid jargon.",
    "Include one concrete example.", "Please keep it brief.", "Use a friendly, casual tone.",
    "Start with a one-line answer, then explain.", "Keep it to one short paragraph.",
]
LEAD_INS = ["Quick question: ", "I'm curious: ", "Something I've always wondered: ", "Random question, but ",
            "My kid asked me this and I couldn't answer: "]

WHY_QUESTIONS = [
    "Why do onions make your eyes water when you cut them?", "Why does ice float instead of sinking?",
    "Why do we get goosebumps?", "Why do cats purr?", "Why does the Moon look bigger near the horizon?",
    "Why do leaves change color in autumn?", "Why does metal feel colder than wood in the same room?",
    "Why do we have leap years?", "Why does salt help melt ice on roads?",
    "Why does my voice sound so strange on recordings?", "Why is the ocean salty when most rivers are not?",
    "Why do airplanes leave white trails across the sky?", "Why does a spoon in a glass of water look bent?",
    "Why do we yawn?", "Why does popcorn pop?", "Why can a huge steel ship float?", "Why do we have seasons?",
    "Why does soap get rid of grease?", "Why does a balloon stick to the wall after you rub it on your hair?",
    "Why do stars twinkle while planets mostly don't?", "Why do our fingers wrinkle in the bath?",
    "Why does the same note sound different on a piano and a guitar?",
    "Why do mosquitoes bite some people more than others?", "Why do apples turn brown after you cut them?",
    "Why is it colder at the top of a mountain if it's closer to the sun?", "Why does hot air rise?",
    "Why does a moving bicycle stay upright?", "Why do magnets stick to a fridge but not to aluminum foil?",
    "Why do some animals hibernate through the winter?", "Why does fizzy water go flat after it's opened?",
    "Why is blood red?", "Why do cold drinks sometimes give you brain freeze?", "Why does the Moon have phases?",
    "Why do microwaves heat food unevenly?", "Why are flamingos pink?", "Why are there two high tides a day?",
    "Why do rubber bands snap back when you stretch them?", "Why does a kettle whistle?",
    "How does sunscreen protect your skin?", "Why can owls turn their heads so far?",
    "Why does iron rust while gold doesn't?", "Why is glass transparent?",
    "Why do we feel dizzy after spinning around?", "Why are soap bubbles always round?",
    "Why does the sky turn orange and red at sunset?", "Why does breathing helium make your voice squeaky?",
    "Why do dogs have such a strong sense of smell?", "Why does old paper turn yellow?",
    "Why does frost form on car windows overnight?", "Why do humpback whales sing?",
    "Why don't antibiotics work against the common cold?", "Why do batteries drain faster in cold weather?",
    "Why do we have fingerprints?", "If clouds are made of water, why don't they fall?",
    "Why do our ears pop on airplanes?", "Why does blowing on hot soup cool it down?",
    "How do chameleons change color?", "Why is Mars red?", "Why do deserts get so cold at night?",
    "Why do cats almost always land on their feet?", "Why do we sneeze?", "Why does a candle flame point upward?",
    "Why do some people get motion sickness in cars?", "Why does bread dough rise?",
    "Why do we hiccup?", "Why is the Dead Sea so easy to float in?", "Why do our eyes have different colors?",
]

HOW_DEVICES = [
    "a refrigerator", "a microwave oven", "noise-cancelling headphones", "a solar panel", "a heat pump",
    "an electric motor", "a 3D printer", "a smoke detector", "an MRI scanner", "a touchscreen",
    "a barcode scanner", "a pressure cooker", "a thermostat", "a hearing aid", "a wind turbine",
    "an induction cooktop", "a dishwasher", "a water filter", "a digital camera sensor", "an electric kettle",
    "a hybrid car", "a GPS receiver", "a fiber-optic cable", "a bicycle's gears", "a mechanical watch",
]
HOW_SYSTEMS = [
    "a credit score", "a search engine", "public-key encryption", "Wi-Fi", "a nuclear power plant",
    "carbon dating", "the stock market", "a vaccine", "the immune system's memory", "QR codes",
    "a spell checker", "recycling plants that sort plastic", "a compass", "an online auction",
    "air traffic control", "weather forecasting", "a contactless card payment", "a postal sorting center",
    "the electricity grid", "a streaming service's recommendations",
]

CONCEPTS = [  # (concept, category)
    ("entropy", "stem"), ("natural selection", "stem"), ("the greenhouse effect", "stem"),
    ("osmosis", "stem"), ("plate tectonics", "stem"), ("the Doppler effect", "stem"),
    ("herd immunity", "stem"), ("radioactive half-life", "stem"), ("antibiotic resistance", "stem"),
    ("the water cycle", "stem"), ("a gene mutation", "stem"), ("dark matter", "stem"),
    ("static electricity", "stem"), ("friction", "stem"), ("inertia", "stem"),
    ("kinetic and potential energy", "stem"), ("acid rain", "stem"), ("the ozone layer", "stem"),
    ("biodiversity", "stem"), ("circadian rhythms", "stem"), ("metabolism", "stem"),
    ("the placebo effect", "stem"), ("the Pythagorean theorem", "stem"), ("prime numbers", "stem"),
    ("exponential growth", "stem"), ("statistical significance", "stem"), ("the scientific method", "stem"),
    ("a carbon footprint", "stem"), ("erosion", "stem"), ("the nitrogen cycle", "stem"),
    ("symbiosis", "stem"), ("the butterfly effect", "stem"), ("absolute zero", "stem"),
    ("a food web", "stem"), ("surface tension", "stem"), ("a light-year", "stem"),
    ("supply and demand", "humanities"), ("opportunity cost", "humanities"), ("inflation", "humanities"),
    ("compound interest", "humanities"), ("confirmation bias", "humanities"),
    ("cognitive dissonance", "humanities"), ("the tragedy of the commons", "humanities"),
    ("comparative advantage", "humanities"), ("the social contract", "humanities"),
    ("Stoicism", "humanities"), ("utilitarianism", "humanities"), ("existentialism", "humanities"),
    ("checks and balances", "humanities"), ("federalism", "humanities"), ("globalization", "humanities"),
    ("the bystander effect", "humanities"), ("Maslow's hierarchy of needs", "humanities"),
    ("the sunk cost fallacy", "humanities"), ("dramatic irony", "humanities"), ("satire", "humanities"),
    ("the hero's journey", "humanities"), ("an unreliable narrator", "humanities"),
    ("the rule of law", "humanities"), ("cultural relativism", "humanities"),
    ("machine learning", "coding"), ("encryption", "coding"), ("cloud computing", "coding"),
    ("open-source software", "coding"), ("a blockchain", "coding"), ("the Domain Name System", "coding"),
    ("a compiler", "coding"), ("binary numbers", "coding"), ("two-factor authentication", "coding"),
    ("a neural network", "coding"),
]

PLURAL_CONCEPTS = {"prime numbers", "circadian rhythms", "binary numbers", "checks and balances",
                   "kinetic and potential energy"}

COMPARE = [  # (a, b, category)
    ("weather", "climate", "stem"), ("a virus", "a bacterium", "stem"), ("speed", "velocity", "stem"),
    ("mass", "weight", "stem"), ("an alligator", "a crocodile", "stem"),
    ("baking soda", "baking powder", "stem"), ("a comet", "an asteroid", "stem"),
    ("a hurricane", "a tornado", "stem"), ("a frog", "a toad", "stem"), ("a moth", "a butterfly", "stem"),
    ("an ocean", "a sea", "stem"), ("a meteor", "a meteorite", "stem"), ("an element", "a compound", "stem"),
    ("a hypothesis", "a theory", "stem"), ("arteries", "veins", "stem"), ("a rabbit", "a hare", "stem"),
    ("AC", "DC electricity", "stem"), ("nuclear fission", "nuclear fusion", "stem"),
    ("a solar eclipse", "a lunar eclipse", "stem"), ("a cold", "the flu", "stem"),
    ("a democracy", "a republic", "humanities"), ("a simile", "a metaphor", "humanities"),
    ("a myth", "a legend", "humanities"), ("a novel", "a novella", "humanities"),
    ("stocks", "bonds", "humanities"), ("a recession", "a depression", "humanities"),
    ("a tragedy", "a comedy in ancient Greek theater", "humanities"),
    ("a primary source", "a secondary source", "humanities"), ("a dialect", "a language", "humanities"),
    ("an autobiography", "a memoir", "humanities"), ("a president", "a prime minister", "humanities"),
    ("Romanticism", "Realism in painting", "humanities"),
    ("RAM", "storage", "coding"), ("a compiler", "an interpreter", "coding"), ("HTTP", "HTTPS", "coding"),
    ("a list", "a tuple in Python", "coding"), ("SQL", "NoSQL databases", "coding"),
    ("a process", "a thread", "coding"), ("frontend", "backend development", "coding"),
    ("Git", "GitHub", "coding"), ("authentication", "authorization", "coding"),
    ("a library", "a framework", "coding"), ("a stack", "a queue", "coding"),
    ("a debit card", "a credit card", "everyday-advice"), ("renting", "buying a home", "everyday-advice"),
    ("baking", "roasting", "everyday-advice"), ("a latte", "a cappuccino", "everyday-advice"),
]

EVENTS = [  # historical events and periods: causes/effects make sense
    "the Industrial Revolution", "the invention of the printing press", "the Protestant Reformation",
    "the Age of Exploration", "the American Revolution", "the Cold War", "the space race",
    "the building of the first transcontinental railroad", "the Great Depression", "the partition of India",
    "the fall of the Berlin Wall", "the Agricultural Revolution", "the invention of the telegraph",
    "the rise of the Mongol Empire", "the abolition of the transatlantic slave trade",
    "the women's suffrage movement", "the Harlem Renaissance", "the Dust Bowl", "the Hundred Years' War",
    "the Viking Age", "the Enlightenment", "the Scientific Revolution", "the Russian Revolution of 1917",
    "the Marshall Plan", "the Irish Potato Famine", "the California Gold Rush", "the Green Revolution",
    "the civil rights movement in the United States", "the end of apartheid in South Africa",
    "the fall of the Western Roman Empire", "the unification of Germany in 1871", "the Meiji era reforms",
    "the Haitian Revolution", "the collapse of the Soviet Union",
]
PLACES = [  # institutions, places and works: no "causes"
    "the Silk Road", "the Library of Alexandria", "the Great Wall of China", "the Rosetta Stone",
    "Mansa Musa's pilgrimage to Mecca", "the Songhai Empire", "Angkor Wat", "the Phoenician alphabet",
    "the Code of Hammurabi", "the Inca road system", "the Hanseatic League", "the Ottoman Empire",
    "the Han dynasty", "the city of Tenochtitlan", "Stonehenge", "the Taj Mahal", "Machu Picchu",
    "the Terracotta Army", "the Globe Theatre", "the Sistine Chapel ceiling", "Petra in Jordan",
    "the Forbidden City", "Great Zimbabwe", "the Alhambra",
]

WORKS = [
    "Pride and Prejudice", "Moby-Dick", "Frankenstein", "Don Quixote", "Jane Eyre", "The Great Gatsby",
    "Nineteen Eighty-Four", "Hamlet", "Macbeth", "The Little Prince", "Things Fall Apart",
    "To Kill a Mockingbird", "Les Misérables", "War and Peace", "Crime and Punishment", "Great Expectations",
    "Wuthering Heights", "Beowulf", "the Epic of Gilgamesh", "One Hundred Years of Solitude",
    "The Tale of Genji", "Dracula", "The Call of the Wild", "A Christmas Carol", "Of Mice and Men",
    "Animal Farm", "The Old Man and the Sea", "Little Women", "Gulliver's Travels", "The Metamorphosis",
    "The Count of Monte Cristo", "Treasure Island",
]

FIGURES = [  # (person, category)
    ("Ada Lovelace", "stem"), ("Marie Curie", "stem"), ("Galileo Galilei", "stem"), ("Charles Darwin", "stem"),
    ("Isaac Newton", "stem"), ("Katherine Johnson", "stem"), ("Alan Turing", "stem"), ("Ibn Sina", "stem"),
    ("Florence Nightingale", "stem"), ("Hypatia of Alexandria", "stem"), ("Rosalind Franklin", "stem"),
    ("Frida Kahlo", "humanities"), ("Socrates", "humanities"), ("Ibn Battuta", "humanities"),
    ("Harriet Tubman", "humanities"), ("Nelson Mandela", "humanities"), ("Simón Bolívar", "humanities"),
    ("Murasaki Shikibu", "humanities"), ("Rumi", "humanities"), ("Mary Wollstonecraft", "humanities"),
    ("Vincent van Gogh", "humanities"), ("Hokusai", "humanities"), ("Jane Austen", "humanities"),
    ("Mahatma Gandhi", "humanities"), ("Sun Tzu", "humanities"), ("Zheng He", "humanities"),
    ("Emmeline Pankhurst", "humanities"), ("Hildegard of Bingen", "humanities"),
    ("Wolfgang Amadeus Mozart", "humanities"), ("Confucius", "humanities"), ("Toni Morrison", "humanities"),
]

GOALS = [  # "to ..." verb phrases for everyday advice
    "sleep better before work days", "save money on groceries", "start running as a complete beginner",
    "learn a new language during my commute", "prepare for a job interview", "stop putting off big projects",
    "make friends after moving to a new city", "organize a small kitchen", "spend less time on my phone at night",
    "drink more water during the day", "get through a long-haul flight comfortably",
    "teach my puppy not to bite", "keep my phone battery healthy", "write a strong cover letter",
    "deal with a coworker who keeps interrupting me in meetings", "plan healthy meals for a busy week",
    "build a journaling habit", "stay focused while working from home", "remember people's names",
    "ask my boss for a raise", "teach my kid to ride a bike", "look after a cast-iron pan",
    "get rid of fruit flies in my kitchen", "pack for a week-long trip with only a carry-on",
    "get my car ready for winter", "recover after a long hike", "make a small apartment feel bigger",
    "build an emergency fund", "start a book club", "get my garden ready for winter",
    "keep my dog cool during a heat wave", "read more books this year", "cook at home instead of ordering takeout",
    "improve my handwriting", "keep my email inbox under control", "train for my first half marathon",
    "feel more confident speaking in public", "waste less food at home", "study more effectively for exams",
    "get along better with my roommate", "stick to a monthly budget", "choose a laptop for university",
    "make my mornings less rushed", "take better photos with my phone", "learn the guitar as an adult",
    "lower my electricity bill", "get my home ready for a new cat", "stay motivated while learning to code",
    "help my elderly parents get comfortable with video calls", "make my resume stand out", "start meditating",
    "keep in touch with friends who live far away", "get over jet lag faster",
    "plan a surprise party without the guest of honor finding out", "clear out a very messy garage in a weekend",
    "host a fun board game night", "travel on a small budget", "keep my kids busy on a rainy day",
    "get better at saying no at work", "ease the stiffness from sitting at a computer all day",
    "keep houseplants alive in a dark apartment", "make a long commute less boring",
    "prepare for my first week at university", "stop impulse buying online", "get back into exercise after a break",
    "write thank-you notes that don't sound generic", "keep a sourdough starter alive",
    "make a good first impression at a networking event", "help a friend who is going through a breakup",
    "set up a simple filing system for my paperwork", "stay warm in a drafty apartment without huge heating bills",
]
SETBACKS = ["I kept forgetting to do it", "it only helped a little", "I got bored after three days",
            "my schedule changed and the routine fell apart", "it felt like too much at once",
            "my family didn't go along with it"]

THINGS = [  # (plural noun phrase for "List five ...", category)
    ("fruits that are high in vitamin C", "stem"),
    ("board games that work well for families with young kids", "everyday-advice"),
    ("questions to ask a landlord before signing a lease", "everyday-advice"),
    ("ways to reuse glass jars", "everyday-advice"),
    ("indoor activities for a rainy weekend", "everyday-advice"),
    ("healthy snacks to pack for a day hike", "everyday-advice"),
    ("things to check before a long road trip", "everyday-advice"),
    ("houseplants that are hard to kill", "everyday-advice"),
    ("free things to do on a Saturday in a new city", "everyday-advice"),
    ("conversation starters for a networking event", "everyday-advice"),
    ("classic novels short enough to read in a weekend", "humanities"),
    ("19th-century inventions that changed daily life", "humanities"),
    ("famous paintings worth seeing in person", "humanities"),
    ("animals that live in the Arctic", "stem"),
    ("renewable sources of energy", "stem"),
    ("simple science experiments kids can do in the kitchen", "stem"),
    ("Python libraries every data analyst should know", "coding"),
    ("habits that help you write clean code", "coding"),
    ("common reasons a website loads slowly", "coding"),
    ("ways to thank a colleague at work", "everyday-advice"),
    ("gift ideas for a friend who loves cooking", "everyday-advice"),
    ("low-cost date ideas", "everyday-advice"),
    ("warm-up exercises to do before a run", "everyday-advice"),
    ("things to pack for a beach day with kids", "everyday-advice"),
    ("questions to ask at the end of a job interview", "everyday-advice"),
    ("dinners that take less than 20 minutes to make", "everyday-advice"),
    ("ways to use less plastic at home", "everyday-advice"),
    ("birthday party themes for an eight-year-old", "everyday-advice"),
    ("signs that an online shop might be a scam", "everyday-advice"),
    ("skills that are useful in almost any job", "everyday-advice"),
    ("instruments you would find in a symphony orchestra", "humanities"),
    ("traditional breakfast dishes from around the world", "humanities"),
    ("reasons to learn a second language", "everyday-advice"),
    ("uses for white vinegar around the house", "everyday-advice"),
    ("dog breeds that do well in apartments", "everyday-advice"),
    ("constellations that are easy to find in the night sky", "stem"),
    ("ancient wonders of the world", "humanities"),
    ("women who changed the course of science", "stem"),
    ("common logical fallacies", "reasoning"),
    ("everyday uses of probability", "stem"),
    ("good practices for naming variables", "coding"),
    ("Git commands a beginner should learn first", "coding"),
    ("ways to make a presentation more engaging", "writing"),
    ("tips for writing a clear email", "writing"),
    ("ideas for a short story set in a small town", "writing"),
    ("words that sound like what they mean", "writing"),
    ("podcast episode ideas for a show about local history", "writing"),
    ("famous speeches worth listening to", "humanities"),
    ("foods that are surprisingly high in protein", "stem"),
    ("ways to cool down a hot apartment without air conditioning", "everyday-advice"),
]

REL_PEOPLE = [("my dad", "fishing"), ("my best friend", "baking"), ("my coworker", "marathon running"),
              ("my niece", "dinosaurs"), ("my grandmother", "crossword puzzles"), ("my brother", "video games"),
              ("my teacher", "astronomy"), ("my roommate", "houseplants"), ("my mom", "gardening"),
              ("my uncle", "old jazz records")]
THANKS = [("my neighbor", "watering my plants while I was away"), ("my son's teacher", "a wonderful school year"),
          ("a colleague", "helping me finish a difficult report"), ("my grandparents", "hosting us for the holidays"),
          ("a nurse", "taking such good care of my father in the hospital"), ("a friend", "helping me move apartments"),
          ("my mentor", "years of patient advice"), ("the volunteers at our food bank", "their hard work this winter"),
          ("my landlord", "fixing the heating so quickly"), ("a stranger", "returning my lost wallet")]
EVENTS_SPEECH = ["my sister's wedding", "my parents' 30th anniversary", "a colleague's retirement party",
                 "the opening of a community garden", "a high-school graduation", "our team's end-of-season dinner",
                 "a friend's 40th birthday", "the launch of a small independent bookshop"]

CREATIVE_FORMS = [
    ("a short poem", "poem"), ("a haiku", "poem"), ("a limerick", "poem"), ("a four-line rhyming poem", "poem"),
    ("a very short story", "story"), ("a diary entry", "story"), ("a short fable with a moral", "story"),
    ("a bedtime story for a six-year-old", "story"), ("the opening paragraph of a mystery novel", "story"),
    ("a short dialogue between two characters", "story"), ("a song chorus", "poem"), ("a short monologue", "story"),
    ("a postcard message", "story"), ("a free-form prose poem", "poem"),
]
CREATIVE_SUBJECTS = [
    "an old lighthouse", "a city bus at dawn", "a lost umbrella", "the last day of summer vacation",
    "a grandmother's recipe book", "a robot learning to paint", "a fox crossing a snowy field",
    "a bakery at four in the morning", "the first day at a new school", "a forgotten toy in an attic",
    "a lonely weather satellite", "two strangers sharing an umbrella", "a cat who thinks it owns the house",
    "moving to a new country", "a street musician", "a garden after the rain", "a dragon who is afraid of heights",
    "rain on a tin roof", "a night market", "an astronaut's first night in space", "a key that opens any door",
    "a tiny village on a cliff", "a message in a bottle", "a clock that runs backward", "a little tea shop",
    "falling autumn leaves", "a kite stuck in a tree", "the northern lights", "a library after closing time",
    "an octopus escaping its aquarium", "a snowman who wants to see spring", "a grandfather's old watch",
    "a hot-air balloon ride", "a city during a power outage", "the smell of fresh bread",
    "a friendship between a mouse and an owl", "a detective cat", "a village where it never stops raining",
    "a paper boat", "a field of sunflowers", "a broken violin", "an abandoned amusement park",
    "a garden gnome that comes alive at night", "a girl who collects clouds", "the deepest part of the ocean",
    "a family road trip gone wrong", "a candle in a window", "a houseplant plotting its escape",
    "the first warm day of spring", "a ferry crossing in the fog", "an old bicycle in a shed",
    "a marathon runner's final mile", "a shy ghost", "a sandcastle racing the tide", "a busy airport at midnight",
]
CREATIVE_MODS = ["rhymes", "is funnier and about half as long", "is written in the second person",
                 "has a happier ending", "would work for a five-year-old", "sounds like it was written in the 1800s",
                 "is told from a different character's point of view"]

ROLES = [
    ("a ship's captain", ["giving passengers a safety briefing before a rough crossing",
                          "describing the strangest thing you have ever seen at sea"]),
    ("a museum curator", ["introducing a newly assembled dinosaur skeleton to visitors",
                          "explaining to a school group why one painting is kept behind glass"]),
    ("a detective in 1920s London", ["questioning a nervous hotel porter about a stolen necklace",
                                     "explaining to your assistant how you solved the case"]),
    ("a park ranger", ["telling hikers what to do if they meet a bear", "explaining to visitors why they shouldn't feed the ducks"]),
    ("a barista at a busy café", ["helping a customer who can't decide what to order"]),
    ("a time traveler from the year 1850", ["riding an escalator for the first time", "trying to understand what a podcast is"]),
    ("a friendly dragon", ["convincing a village council to let you stay in the hills", "giving a tour of your treasure cave"]),
    ("a school librarian", ["recommending books to a student who says reading is boring"]),
    ("an astronaut on the International Space Station", ["answering a child's question about how you sleep in space",
                                                         "describing a sunrise seen from orbit"]),
    ("a chess coach", ["calming a nervous student before their first tournament"]),
    ("a football coach at half-time", ["giving a pep talk to a team that is losing 2-0"]),
    ("a Victorian inventor", ["presenting your newest contraption to skeptical investors"]),
    ("an ancient oak tree", ["telling a young squirrel what the forest looked like three hundred years ago"]),
    ("a zookeeper", ["explaining to visitors how you keep the elephants happy and healthy"]),
    ("a customer service agent", ["helping a caller whose package never arrived", "handling a customer who wants a refund for a gift"]),
    ("a chef on a cooking show", ["showing viewers how to make a simple omelette", "rescuing a sauce that has gone lumpy"]),
    ("a tour guide in Kyoto", ["showing visitors around a temple garden"]),
    ("a game show host", ["introducing the three contestants on tonight's episode"]),
    ("a wise grandmother", ["giving advice to a grandchild who is nervous about leaving home"]),
    ("a spaceship's onboard computer", ["informing the crew that the coffee supply has run out"]),
    ("a flight attendant", ["calming passengers during a patch of turbulence"]),
    ("a news reporter in the year 3000", ["covering the opening of the first hotel on Mars"]),
    ("a Roman soldier", ["writing a letter home from a fort on Hadrian's Wall"]),
    ("an Antarctic researcher", ["recording a video diary during a blizzard"]),
    ("a bookshop owner", ["persuading a customer to give poetry a chance"]),
    ("an elf in Santa's workshop", ["reporting a problem on the toy production line"]),
    ("a ghost who haunts an old theater", ["introducing yourself to the new stage manager"]),
    ("a veterinarian", ["explaining to a child why their rabbit needs to eat hay"]),
    ("a hotel receptionist", ["handling a tired guest whose room is not ready yet"]),
    ("a history teacher", ["opening a lesson on ancient Mesopotamia in an exciting way"]),
    ("a marine biologist", ["describing a coral reef to someone who has never seen the sea"]),
    ("a robot butler", ["explaining to the family why you refused to make dessert"]),
    ("an explorer who has just reached the South Pole", ["sending a short radio message home"]),
    ("a snail who has entered a race", ["giving a pre-race interview"]),
    ("a medieval castle cook", ["planning a feast for a king who hates onions"]),
    ("a translator at an international summit", ["explaining a misunderstanding between two delegates"]),
    ("a travel vlogger", ["introducing viewers to a tiny island with no cars"]),
    ("a sports referee", ["explaining a controversial decision to an angry team captain"]),
    ("a tech support worker", ["walking an elderly caller through restarting their router"]),
    ("a theater director", ["giving notes to the cast after a messy dress rehearsal"]),
    ("a house cat", ["complaining to the dog about the new baby in the family"]),
    ("a kindergarten teacher", ["explaining to the class why we wash our hands before lunch"]),
    ("a famous explorer's parrot", ["telling the story of your owner's greatest voyage"]),
    ("a real estate agent", ["showing a very small apartment as if it were a palace"]),
    ("a dentist", ["reassuring a nervous patient before a filling"]),
    ("an old lighthouse keeper", ["describing the night of the worst storm you remember"]),
    ("a librarian in the year 2200", ["explaining to a visitor what paper books were for"]),
    ("a nervous wedding planner", ["telling the couple that the cake has been delivered to the wrong venue"]),
    ("a mountain goat", ["giving a tourist advice on how to climb a cliff"]),
    ("a dinosaur who woke up in a modern city", ["describing your first day"]),
    ("a crossword puzzle editor", ["rejecting a clue that is far too easy"]),
    ("a submarine captain", ["announcing to the crew that you are about to dive deeper than ever before"]),
    ("a medieval monk copying books by hand", ["complaining about the invention of the printing press"]),
    ("a city pigeon", ["explaining the best places to find crumbs to a pigeon from the countryside"]),
    ("a car mechanic", ["explaining to a worried customer what that strange rattling noise is"]),
    ("a school principal", ["announcing a surprise snow day over the loudspeaker"]),
    ("a 1950s radio announcer", ["reading an advertisement for a brand-new invention called the television"]),
    ("a pastry chef", ["judging a children's cupcake competition kindly but honestly"]),
    ("a tourism officer for a tiny island", ["promoting the island's quiet beaches to people from a big city"]),
]

SYLLOGISMS = [  # (A, B, C) read as: All A are B. Some B C.
    ("the members of the chess club", "students", "play the violin"),
    ("the dogs at this shelter", "vaccinated animals", "are older than ten"),
    ("the cars in this parking lot", "electric vehicles", "are red"),
    ("the employees on the third floor", "engineers", "work remotely on Fridays"),
    ("the apples in this basket", "organic fruit", "came from Spain"),
    ("the books on the top shelf", "novels", "are signed by the author"),
    ("the runners in the race", "club members", "are under twenty"),
    ("the paintings in this room", "oil paintings", "are fakes"),
    ("the houses on Elm Street", "brick buildings", "have solar panels"),
    ("the players on the team", "teenagers", "wear glasses"),
]
ARGUMENTS = [
    "Every time I wash my car, it rains the next day, so washing my car must cause rain.",
    "My grandfather smoked every day and lived to 95, so smoking can't be that harmful.",
    "Nobody has proven that ghosts don't exist, so they must be real.",
    "If we let students retake one quiz, soon they'll want to retake every exam and grades will mean nothing.",
    "This restaurant must serve great food because it's always full.",
    "You can't trust her views on public transport; she owns a car.",
    "Either we ban phones in every classroom or students will never learn anything.",
    "Everyone I know loved this movie, so it must be the best film of the year.",
    "The new manager started in March and sales fell in April, so the new manager caused the drop.",
    "Expensive wine tastes better, so an $80 bottle must be better than a $15 one.",
    "I flipped a coin five times and got heads every time, so tails is due next.",
    "Our town has more doctors than the next town and also more sick people, so doctors make people sick.",
    "Everyone is buying this stock right now, so its price can't go down.",
    "He failed his first driving test, so he'll never be a good driver.",
    "Crime went up the year the new library opened, so the library attracts criminals.",
    "This diet must work because thousands of people have shared their success stories online.",
]
ALWAYS_SOMETIMES = [
    "The sum of two odd numbers is even.", "A square is a rectangle.",
    "Multiplying a number by a fraction makes it smaller.", "The product of two negative numbers is negative.",
    "A triangle can have two right angles.", "If a number is divisible by 6, it is divisible by 3.",
    "Half of a number is smaller than the number.", "A number squared is bigger than the number itself.",
    "Dividing by a number between 0 and 1 makes the result larger.", "A rhombus has four equal angles.",
    "The last digit of a prime number greater than 10 is 1, 3, 7, or 9.",
]
CLASSIC_PUZZLES = [
    "A farmer has to cross a river with a wolf, a goat, and a cabbage. His boat holds only him and one of them. "
    "The wolf can't be left alone with the goat, or the goat with the cabbage. How does he get everything across?",
    "A bat and a ball cost $1.10 together. The bat costs $1.00 more than the ball. How much does the ball cost? "
    "Explain why the quick answer is wrong.",
    "If 5 machines take 5 minutes to make 5 widgets, how long would 100 machines take to make 100 widgets?",
    "A patch of lily pads doubles in size every day. It takes 48 days to cover the whole lake. "
    "How many days does it take to cover half the lake?",
    "You have a 3-liter jug and a 5-liter jug and unlimited water. How can you measure exactly 4 liters?",
    "Three boxes are labeled 'apples', 'oranges', and 'apples and oranges', and every label is wrong. "
    "You may take one fruit from one box. How can you fix all the labels?",
    "There are three light switches outside a closed room, and one of them controls a lamp inside. "
    "You can enter the room only once. How do you find out which switch it is?",
    "Mary's father has five daughters: Nana, Nene, Nini, and Nono. What is the fifth daughter's name?",
    "A man pointing at a photo says: 'Brothers and sisters I have none, but that man's father is my father's son.' "
    "Who is in the photo?",
    "On an island, knights always tell the truth and knaves always lie. A says, 'We are both knaves.' "
    "What are A and B?",
    "You are in a race and you overtake the person in second place. What place are you in now?",
    "A clock shows 3:15. What is the angle between the hour hand and the minute hand? Explain your working.",
    "Four people need to cross a bridge at night with one flashlight. They take 1, 2, 5, and 10 minutes, and at "
    "most two can cross at once. What is the fastest time for all of them to cross?",
    "How many times a day do a clock's hour and minute hands point in exactly the same direction?",
]

# --- text banks for rewriting, extraction and summarization ---

CASUAL = [
    "hey, can u send me the report by tmrw? thx", "sorry i'm gonna be late, the bus never showed up",
    "we're out of printer paper again, can someone pls order more", "can't make it to the meeting, something came up",
    "got ur email, will look at it later today", "the wifi in the office is super slow, can someone fix it",
    "just checking if u got my message about the invoice", "heads up, the client moved the call to 3",
    "need those slides asap, the boss keeps asking", "thanks a ton for covering my shift yesterday!!",
    "can we push the deadline a bit? stuff is piling up", "fyi the kitchen fridge gets cleaned out on friday",
    "parking lot's closed today so just park on the street", "idk if the budget covers this, can u check?",
    "gonna work from home tmrw, ping me if anything's urgent",
]
STIFF = [
    "Please be advised that your request has been received and will be processed in due course.",
    "It is hereby requested that all staff refrain from leaving personal items in the corridor.",
    "Your attendance at the aforementioned event is kindly requested.",
    "Kindly ensure that the attached documentation is completed prior to your arrival.",
    "We regret to inform you that the item you ordered is currently unavailable.",
    "Residents are reminded that refuse must be placed in the designated receptacles.",
    "The undersigned wishes to express gratitude for your continued patronage.",
    "Failure to return borrowed equipment may result in the suspension of borrowing privileges.",
    "Participants are required to present valid identification upon entry.",
    "Please refrain from utilizing mobile telephones during the performance.",
    "In accordance with company policy, all expense claims must be submitted within thirty days.",
    "Your subscription will be terminated unless payment is received by the date indicated.",
]
ERRORS = [
    "Me and him goes to the gym every mornings before work.",
    "Their going to announce the winners tomorow, so dont be late.",
    "The results of the survey shows that most peoples prefers tea.",
    "I should of called you yesterday but I forgot my phone at home.",
    "Each of the students have their own locker, but the locks is broken.",
    "She don't like when people talks during the movie.",
    "We was planning to visit the museum, but it were closed.",
    "Its important to check you're work before you submit it.",
    "The team have finish there project one week early.",
    "Less people came to the party then we expected.",
    "Between you and I, the new schedule make no sense.",
    "He runned to the store because he had forget the milk.",
    "Neither the manager nor the employees was told about the change.",
    "Who's jacket is this, and why is it laying on the floor?",
    "I seen that movie already, it was more better than the book.",
]
PASSIVE = [
    "The cake was eaten by the children before the guests arrived.",
    "The new bridge was opened by the mayor last Tuesday.", "Mistakes were made in the final report.",
    "The window was broken by a stray baseball.", "The email was sent to the wrong customer by our system.",
    "The match was won by the visiting team in the final minute.",
    "The song was written by two students in a single afternoon.",
    "The old library is being renovated by a local company.",
    "The rules were explained to the players by the referee.",
    "A new species of frog was discovered by researchers in the rainforest.",
    "The decision will be announced by the committee on Friday.",
    "The garden is watered every evening by the boy next door.",
]
WORDY = [
    "At this point in time, we are currently in the process of reviewing all of the applications that we have received.",
    "Due to the fact that it was raining, the game was postponed until a later date in the future.",
    "In my personal opinion, I think that we should probably consider the possibility of hiring more staff.",
    "The reason why the project was delayed is because of the fact that the supplier was late.",
    "It is absolutely essential and very important that everyone arrives on time for the meeting.",
    "We would like to take this opportunity to thank each and every one of you for all of your help.",
    "In the event that you have any questions, please do not hesitate to get in touch with us.",
    "She made the decision to go ahead and cancel the trip because of the bad weather conditions.",
    "The committee reached a consensus of opinion that the park should be closed during the winter months.",
    "For all intents and purposes, the new software basically does the same exact thing as the old software.",
]
PROCEDURES = [
    "To reset the router, unplug it, wait thirty seconds, plug it back in, and then wait for the lights to turn green.",
    "When you arrive, sign in at the front desk, pick up your badge, and take the elevator to the fourth floor.",
    "First rinse the rice, then add twice as much water, bring it to a boil, cover it, and simmer for fifteen minutes.",
    "To change a flat tire, loosen the nuts, jack up the car, swap the wheel, tighten the nuts, and lower the car.",
    "Before you leave the lab, switch off the burners, wash your equipment, wipe the bench, and log your results.",
    "To repot a plant, water it the day before, ease it out of the pot, loosen the roots, and set it in fresh soil.",
    "To join the call, open the invitation, click the link, allow microphone access, and wait for the host to let you in.",
    "To close the shop, count the till, lock the back door, turn off the lights, and set the alarm on your way out.",
]
JARGON = [
    "We need to leverage our core competencies to drive synergies across verticals.",
    "The patient presented with acute rhinitis and mild pyrexia.",
    "Let's circle back offline and align on the deliverables before EOD.",
    "The app's latency spikes are caused by unoptimized database queries under heavy load.",
    "The tenant shall indemnify the landlord against all claims arising from the tenant's use of the premises.",
    "Our Q3 KPIs indicate a downward trend in customer retention metrics.",
    "The precipitation probability for the region is elevated throughout the forecast period.",
    "Please ensure all PII is redacted before the dataset is shared externally.",
    "The defendant's motion for summary judgment was denied.",
    "This medication is contraindicated in patients with hepatic impairment.",
]
REVIEWS = [
    "The hotel room was tiny and breakfast was cold, but the staff were really friendly.",
    "These headphones sound fine, but they hurt my ears after an hour.",
    "Delivery took two weeks and the box was crushed, although the lamp itself works perfectly.",
    "The class moved way too fast for beginners, and the teacher rarely answered questions.",
    "The restaurant was loud and the portions were small, but the dessert was amazing.",
    "The app crashes every time I try to upload a photo, which makes it useless for me.",
    "Great battery life and a bright screen, but the keyboard feels cheap and rattles.",
    "The tour guide was funny and knowledgeable, though the bus was late and too crowded.",
]
PLAIN = [
    "The room was messy.", "It was a hot day.", "The old man sat on the bench.", "The bus was late again.",
    "The forest was quiet.", "She was nervous before the exam.", "The market was busy.",
    "The storm hit the coast at night.", "The kitchen smelled good.", "He opened the old letter.",
]

PASSAGES = [
    "The city will replace its old streetlights with LED bulbs over the next two years. The new lights use about "
    "half as much electricity and last much longer. Officials expect the savings to pay for the project within six years.",
    "Researchers tracked 500 office workers for a year. Those who took short walks during the day reported less back "
    "pain and better focus than those who stayed at their desks.",
    "Our community pool will open for the summer on June 10. Swimming lessons for children start the following week, "
    "and sign-up forms are available at the front desk.",
    "Octopuses can change the color and texture of their skin in a fraction of a second. They use this ability to "
    "hide from predators and to sneak up on prey.",
    "The bakery on Main Street is closing after forty years. The owners say they are retiring, and they thanked "
    "customers for decades of loyalty. The last day of business is Saturday.",
    "Learning a musical instrument as an adult is harder than as a child, but it is far from impossible. Regular "
    "short practice sessions tend to work better than occasional long ones.",
    "A new study suggests that people who keep a gratitude journal sleep slightly better. The effect was small, but it "
    "appeared after only two weeks.",
    "Tomatoes were once thought to be poisonous in parts of Europe. Wealthy diners ate from pewter plates, and acidic "
    "foods like tomatoes drew lead out of the metal, which made people sick.",
    "The museum's new dinosaur hall opens next month. It features a full-size skeleton, touchable fossils, and a "
    "digging area for young visitors.",
    "Many people think goldfish have a three-second memory. In fact, experiments show they can remember things for "
    "months and can even be trained to respond to sounds.",
    "Starting in March, the train company will add two early-morning services on weekdays. The change follows "
    "complaints from commuters about crowded carriages before 8 a.m.",
    "Honey almost never spoils. Its low water content and natural acidity make it very hard for bacteria to grow, "
    "which is why edible honey has been found in ancient tombs.",
    "The school board voted to extend the lunch break by ten minutes. Teachers said students had too little time to "
    "eat, especially those who waited in long cafeteria lines.",
    "Working from home saves many people time on commuting, but some say they feel lonely and find it harder to "
    "separate work from the rest of their lives.",
    "Volunteers planted more than 2,000 native shrubs along the river last weekend. The plants will help prevent "
    "erosion and give birds and insects a place to live.",
    "Dear residents, the water supply will be turned off on Thursday from 9 a.m. to 1 p.m. for pipe repairs. Please "
    "store some water in advance. We apologize for the inconvenience.",
    "The film follows a retired pianist who agrees to teach a stubborn teenager. The acting is warm and the music is "
    "lovely, although the ending feels rushed.",
    "Electric scooters have become popular in many cities. Supporters say they reduce car traffic, while critics "
    "complain about scooters left blocking sidewalks.",
    "Cats sleep between twelve and sixteen hours a day. Their wild ancestors hunted in short bursts and needed long "
    "periods of rest to save energy.",
    "The town's annual book sale raised $4,800 this year, a record. The money will pay for new picture books and a "
    "reading corner in the children's section.",
    "Hi all, the quarterly review has moved from Tuesday to Wednesday at 2 p.m. Please have your updated numbers ready "
    "and send any slides to Priya by Monday evening.",
    "Some scientists argue that schools should teach basic cooking. Students who learn to cook, they say, eat more "
    "healthily as adults and waste less food.",
    "The bridge will be closed to cars for three weekends while workers repaint it. Pedestrians and cyclists can "
    "still cross using a protected lane on the north side.",
    "Sloths move so slowly that algae grow on their fur. The green tint actually helps them blend in with the trees "
    "and hide from predators.",
    "After a long debate, the council approved a plan to turn an empty parking lot into a small park with a "
    "playground, benches, and a weekly farmers' market.",
    "Hiccups happen when the diaphragm suddenly tightens and the vocal cords snap shut. Most bouts end on their own "
    "within a few minutes.",
    "Our online store will be down for maintenance on Sunday between midnight and 6 a.m. Orders placed before then "
    "will ship as usual.",
    "The novel tells the story of two sisters who inherit a failing vineyard. Over one difficult year they learn to "
    "run the business and, slowly, to trust each other again.",
    "Wearing a helmet reduces the risk of a serious head injury in a bike crash by about two thirds, according to a "
    "large review of studies from several countries.",
    "A local teenager has started a free repair café where volunteers fix broken lamps, toasters, and bikes. She hopes "
    "it will keep useful things out of landfills.",
]
TALES = [
    "Cinderella", "The Tortoise and the Hare", "Little Red Riding Hood", "The Boy Who Cried Wolf",
    "Jack and the Beanstalk", "The Ugly Duckling", "The Three Little Pigs", "Rapunzel", "The Emperor's New Clothes",
    "The Princess and the Pea", "Sleeping Beauty", "Rumpelstiltskin", "The Little Mermaid", "Pinocchio",
    "The Pied Piper of Hamelin", "The Gingerbread Man", "The Frog Prince", "Puss in Boots", "The Fox and the Grapes",
    "The Lion and the Mouse", "The Goose That Laid the Golden Eggs", "Beauty and the Beast", "Snow White",
]
PROVERBS = [
    "a stitch in time saves nine", "don't count your chickens before they hatch", "the early bird catches the worm",
    "actions speak louder than words", "too many cooks spoil the broth", "Rome wasn't built in a day",
    "look before you leap", "don't put all your eggs in one basket", "the grass is always greener on the other side",
    "practice makes perfect", "better late than never", "when in Rome, do as the Romans do",
    "you can't judge a book by its cover", "every cloud has a silver lining", "many hands make light work",
    "a watched pot never boils", "the pen is mightier than the sword", "still waters run deep",
]
PURPOSES = [
    "a budget", "a passport", "a will", "a résumé", "a seatbelt", "a warranty", "a constitution", "a thesaurus",
    "jury duty", "a speed bump", "a password manager", "a dress rehearsal", "a fire extinguisher", "a museum",
    "a library card", "an annual check-up", "a recycling program", "a lighthouse", "a table of contents",
]

NAMES = [
    "Amara", "Ben", "Chen", "Dana", "Elif", "Felipe", "Grace", "Hiro", "Ines", "Jonah", "Kavya", "Lena", "Mateo",
    "Nadia", "Oscar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Ximena", "Yusuf", "Zoe",
    "Aisha", "Bruno", "Carmen", "Dmitri", "Esther", "Farid", "Greta", "Hannah", "Ivan", "Jasmine", "Kofi", "Lucia",
    "Marco", "Noor",
]
SHE = {"Amara", "Dana", "Elif", "Grace", "Ines", "Kavya", "Lena", "Nadia", "Priya", "Rosa", "Uma", "Wen", "Ximena",
       "Zoe", "Aisha", "Carmen", "Esther", "Greta", "Hannah", "Jasmine", "Lucia", "Noor"}
CITIES = [
    "Lisbon", "Kyoto", "Mexico City", "Edinburgh", "Vancouver", "Istanbul", "Buenos Aires", "Seoul", "Marrakesh",
    "Copenhagen", "Cape Town", "Hanoi", "Prague", "Melbourne", "Montreal", "Vienna", "Lima", "Dublin", "Singapore",
    "Krakow", "Athens", "Nairobi", "Oslo", "Seville", "Taipei", "Budapest", "Chicago", "Porto", "Valparaíso", "Tbilisi",
]
ITEMS_PRICED = [("a rice cooker", 60, 140), ("a winter coat", 80, 220), ("a pair of running shoes", 70, 160),
                ("a desk lamp", 25, 60), ("a bicycle helmet", 40, 90), ("a backpack", 35, 95),
                ("a blender", 45, 120), ("an office chair", 120, 300), ("a tent", 90, 260), ("a guitar", 150, 400)]

# --- code ---
LANGS = [("Python", "list"), ("JavaScript", "array"), ("TypeScript", "array"), ("Go", "slice"),
         ("Rust", "vector"), ("Java", "list"), ("C#", "list"), ("Ruby", "array")]
LANG_WEIGHTS = [8, 4, 1, 1, 1, 2, 1, 1]
CODE_TASKS = [
    "checks whether a year is a leap year", "reverses the order of the words in a sentence",
    "removes duplicates from a {seq} while keeping the original order", "finds the second largest number in a {seq}",
    "converts a temperature from Celsius to Fahrenheit", "merges two sorted {seq}s into one sorted {seq}",
    "checks whether an email address looks valid", "flattens a nested {seq} of numbers",
    "returns the n-th Fibonacci number without recursion", "checks whether two words are anagrams",
    "groups a {seq} of words by their first letter", "computes the median of a {seq} of numbers",
    "converts a Roman numeral to an integer", "finds the most common element in a {seq}",
    "splits a {seq} into chunks of size n", "checks whether a number is prime",
    "computes the greatest common divisor of two numbers", "rotates a {seq} to the right by k positions",
    "finds all pairs of numbers in a {seq} that add up to a target", "generates a random password of a given length",
    "returns the longest word in a sentence", "checks whether the brackets in a string are balanced",
    "performs a binary search on a sorted {seq}", "transposes a matrix", "removes punctuation from a string",
    "shortens a string to n characters and adds an ellipsis", "returns the running totals of a {seq} of numbers",
    "checks whether a string is a valid IPv4 address", "converts a number of seconds to hours, minutes, and seconds",
    "finds the missing number in a {seq} containing 1 to n with one number left out",
    "turns a title into a URL slug", "converts an integer to its binary representation",
    "checks whether a sentence uses every letter of the alphabet", "computes the dot product of two vectors",
    "counts the number of lines in a text file", "returns the intersection of two {seq}s",
    "compresses a string like 'aaabcc' into 'a3b1c2'", "calculates the total price of a shopping cart with a discount code",
    "validates that a password has at least 8 characters, a digit, and an uppercase letter",
    "returns the k largest numbers in a {seq}", "checks whether a matrix is symmetric",
    "parses a date string like '2024-03-15' into year, month, and day", "sums the digits of an integer",
]
CODE_EXTENSIONS = ["also handles an empty input without crashing", "runs quickly on inputs with millions of items",
                   "raises a helpful error when it gets the wrong type of input", "comes with a few unit tests"]
CODE_CONCEPTS = [
    "a hash map", "a REST API", "a race condition", "Big-O notation", "version control", "a unit test",
    "an environment variable", "a closure in JavaScript", "a decorator in Python", "a database index",
    "a foreign key in SQL", "garbage collection", "a deadlock", "a Python virtual environment", "async/await",
    "a list comprehension", "dependency injection", "a regular expression", "caching", "a merge conflict in Git",
    "type hints in Python", "a null pointer exception", "JSON", "a pull request", "an interface in Java",
    "a lambda function", "a generator in Python", "a Docker container", "a cron job", "a SQL join", "a primary key",
    "object-oriented programming", "a pure function", "a hash function", "an off-by-one error", "a stack overflow error",
    "technical debt", "an API key", "a callback function", "pagination in an API",
]
SQL_TASKS = [
    ("orders(id, customer_id, amount, created_at)", ["finds the total amount each customer spent in 2024",
                                                     "returns the five largest orders", "counts how many orders were placed each month"]),
    ("employees(id, name, manager_id, hired_on)", ["lists each employee next to their manager's name",
                                                   "finds everyone hired in the last 90 days"]),
    ("books(id, title, author, year, copies)", ["finds authors with more than three books in the table",
                                                "lists books published before 1950, newest first"]),
    ("products(id, name, price, category)", ["returns the cheapest product in each category",
                                             "finds categories whose average price is above 50"]),
    ("page_views(user_id, url, viewed_at)", ["counts distinct visitors per day", "finds the ten most visited pages"]),
    ("rentals(id, bike_id, started_at, ended_at)", ["finds the average rental length in minutes",
                                                    "lists bikes that were never rented in June"]),
]
BUGS = [
    ("Python", "def add_item(item, items=[]):\n    items.append(item)\n    return items",
     "keep items from earlier calls"),
    ("Python", "for i in range(1, 10):\n    print(i)", "stop at 9 instead of 10"),
    ("Python", "nums = [2, 4, 6, 7]\nfor n in nums:\n    if n % 2 == 0:\n        nums.remove(n)\nprint(nums)",
     "print [4, 7] instead of [7]"),
    ("Python", "total = '0'\nfor price in ['3', '4']:\n    total += price\nprint(total)", "print 034 instead of 7"),
    ("Python", "print(0.1 + 0.2 == 0.3)", "print False"),
    ("Python", "grid = [[0] * 3] * 3\ngrid[0][0] = 1\nprint(grid)", "change the first value of every row"),
    ("Python", "name = input('Name: ')\nif name == 'Alice' or 'Bob':\n    print('Welcome!')",
     "welcome everyone, whatever name they type"),
    ("Python", "count = 0\ndef increment():\n    count += 1\nincrement()", "raise an UnboundLocalError"),
    ("JavaScript", "console.log([10, 9, 1].sort());", "print [1, 10, 9]"),
    ("JavaScript", "for (var i = 0; i < 3; i++) {\n  setTimeout(() => console.log(i), 100);\n}", "print 3 three times"),
    ("JavaScript", "const user = {name: 'Ana'};\nconsole.log(user.Name);", "print undefined"),
    ("Python", "s = 'hello'\ns[0] = 'H'", "raise a TypeError"),
    ("Python", "def average(nums):\n    return sum(nums) / len(nums)\n\nprint(average([]))", "crash"),
    ("JavaScript", "console.log('5' + 3, '5' - 3);", "print 53 and 2"),
]

# --- instruction scenarios ---
DIETS = ["two of them are vegetarian", "one guest can't eat nuts", "I only have a small oven and two burners",
         "one guest is vegan and another doesn't like spicy food", "I want to spend less than $60 in total",
         "most of the guests are children"]
EMAILS = [
    ("my landlord", "asking when the broken heater will be repaired"), ("my manager", "asking to work from home two days a week"),
    ("a customer", "apologizing for a late delivery"), ("my son's teacher", "explaining that he will miss two days of school for a family event"),
    ("a hiring manager", "following up a week after my interview"), ("my professor", "asking for a short extension on an essay"),
    ("my team", "announcing that our weekly meeting is moving to Thursday"), ("a hotel", "asking whether they can store my luggage after checkout"),
    ("a supplier", "asking why the last order arrived damaged"), ("a former colleague", "asking if they would be a reference for me"),
    ("the city council", "requesting a pedestrian crossing near the primary school"), ("my gym", "cancelling my membership"),
    ("a new client", "introducing myself as their account manager"), ("the people on my street", "inviting them to a small garden party"),
    ("a conference organizer", "asking whether students can submit talk proposals"), ("a restaurant", "booking a table for a group of twelve"),
    ("a contractor", "asking for a quote to fix a leaking roof"), ("my book club", "suggesting next month's book"),
    ("a volunteer group", "thanking them and asking them to help again next year"), ("my bank", "disputing a charge I don't recognize"),
]
TALKS = [
    ("why sleep matters for learning", "a class of high-school students"), ("the history of our town", "new residents"),
    ("getting started with budgeting", "first-year university students"), ("how to spot fake news", "a group of retirees"),
    ("what I learned from a year of cycling to work", "my coworkers"), ("the basics of composting", "a community garden group"),
    ("why we should all learn a little code", "parents at a school evening"), ("protecting your accounts online", "small-business owners"),
    ("the life cycle of a star", "a children's science club"), ("what makes a good team", "new team leads"),
    ("the benefits of reading aloud to kids", "new parents"), ("why local libraries still matter", "a city council meeting"),
]
EXAMS = ["a high-school chemistry final", "my driving theory test", "a Spanish B1 exam", "a university statistics exam",
         "a history exam on the 20th century", "a technical coding interview", "an introductory biology exam",
         "a grade 5 piano exam", "an accounting certification exam", "the SAT"]
JOBS = ["nurse", "high-school math teacher", "software developer", "graphic designer", "carpenter", "pharmacist",
        "wedding photographer", "accountant", "chef", "physiotherapist", "librarian", "civil engineer", "social worker",
        "bike mechanic", "data analyst", "florist"]
HOBBIES = ["hiking", "baking bread", "birdwatching", "playing the cello", "trail running", "pottery", "chess",
           "growing tomatoes", "sea kayaking", "board games", "knitting", "photography", "salsa dancing", "rock climbing"]
PLATFORMS = ["my company's website", "a conference program", "a dating app profile", "my LinkedIn profile",
             "a podcast guest introduction", "our community newsletter"]
OCCASIONS = ["a child's birthday party", "an office holiday party for 20 people", "a family reunion picnic",
             "a baby shower", "a graduation party", "a neighborhood summer barbecue"]
BUSINESSES = ["a small bakery that specializes in sourdough", "a mobile dog-grooming van", "a bike repair shop",
              "a plant shop", "a math tutoring service", "a vegan food truck", "a second-hand bookstore", "a yoga studio",
              "a house-cleaning company", "a board game café", "an online shop for handmade candles", "a pottery studio",
              "a coding club for kids", "a tea shop", "a hiking tour company", "an ice cream parlor"]
PRODUCTS = [
    ("a reusable water bottle", "it keeps drinks cold for 24 hours and fits in a car cup holder"),
    ("a foldable electric bike", "it folds in ten seconds and has a 60 km range"),
    ("a pair of wool hiking socks", "they dry quickly and don't itch"),
    ("a smart plant pot", "it waters itself and sends a reminder when the tank is low"),
    ("a handmade leather notebook", "it lies flat when open and has refillable pages"),
    ("a kids' wooden building set", "it has 120 pieces and no small parts"),
    ("a travel pillow", "it packs into its own pouch and supports your neck on long flights"),
    ("a cast-iron skillet", "it works on any stove and comes pre-seasoned"),
    ("a solar-powered phone charger", "it charges a phone twice on one day of sun and is waterproof"),
    ("a noise machine for sleeping", "it has twelve calming sounds and a timer"),
    ("a recycled-plastic backpack", "it has a padded laptop sleeve and a hidden pocket"),
    ("a weekly meal-planning pad", "it has a tear-off shopping list and room for notes"),
]
EXPLAIN_TO = [("why the office is switching to a new time-tracking app", "my team"),
              ("how phishing emails work", "my grandparents"), ("why the school lunch menu is changing", "parents at our school"),
              ("why backups matter", "a small nonprofit's volunteers"), ("what a heat wave warning means", "a class of ten-year-olds"),
              ("the new recycling rules", "the residents of our building"), ("why we're moving to a four-day work week", "our customers")]
TRIPS = [("camping", "two adults and a dog"), ("cycling", "a family with two kids under ten"),
         ("canoeing", "four friends who have never done it before"), ("hiking", "a school club of twelve teenagers"),
         ("camping", "a grandparent and two grandchildren"), ("hiking", "a couple in their sixties")]
DECLINE = [("a friend", "an invitation to their wedding abroad"), ("a colleague", "a request to take on another project"),
           ("a recruiter", "a job offer"), ("my cousin", "a request to borrow my car for a month"),
           ("a client", "a last-minute meeting on a Sunday"), ("my sister", "her request that I host the holidays this year")]
NEW_HOBBIES = ["rock climbing", "watercolor painting", "birdwatching", "knitting", "film photography", "sourdough baking",
               "chess", "open-water swimming", "woodworking", "calligraphy", "stargazing with a small telescope",
               "the ukulele", "trail running", "pottery"]
ANALOGY_DOMAINS = ["cooking", "football", "city traffic", "a library", "gardening", "music", "shopping", "a school"]

# ---------------------------------------------------------------------------------------------------
# Eval closeness
# ---------------------------------------------------------------------------------------------------

# subjects of eval prompts: a composed prompt that names one is dropped (a paraphrase risk, not a leak)
EVAL_SUBJECTS = re.compile("|".join([
    r"\bbees?\b(?!keeper)", r"mountain guide", r"\bsummit day", r"herald", r"blacksmith", r"factory robot",
    r"\bdj\b", r"lifeguard", r"fortune", r"scarecrow", r"generation ship", r"map-?mak", r"cartograph",
    r"shadow", r"\bcaf[eé] on a rainy", r"factorial", r"while loop", r"linked list", r"memory leak",
    r"average salary", r"capitali[sz]", r"with statement", r"how often each word", r"word frequenc",
    r"volcan", r"lightning", r"\bph\b", r"kidney", r"migrat", r"feather", r"vacuum", r"weigh.{0,20}moon",
    r"moon.{0,20}weigh", r"stars only", r"french revolution", r"cleopatra", r"odyssey", r"byzantine",
    r"parthenon", r"baroque", r"black death", r"\bplague", r"\bethics\b", r"toddler", r"vegetable",
    r"tidy desk", r"messy desk", r"\bcoffee (intake|habit)", r"how much coffee", r"loud music",
    r"better listener", r"balcony", r"used car", r"\bstale\b", r"tool-lending", r"hansel", r"otters?\b",
    r"plant more trees", r"fire drill", r"measure twice", r"maple", r"swimming pool", r"percentage increase",
    r"twice a number", r"area of a triangle", r"remainder when", r"\bpace\b", r"next prime", r"factor the",
    r"edges does", r"closed every monday", r"add up to 11", r"\bpills?\b", r"\bsocks\b(?! that)", r"supplement",
    r"half full", r"nickel", r"ages of the children", r"printer keeps", r"new job",
]), re.I)

STOP = set("""a an the and or but if then so of to in on at by for with from as is are was were be been being it its
this that these those i me my we our you your he she they them his her their what which who whom how why when where
do does did can could should would will shall may might must not no yes than too very just about into over under
up down out more most some any each every all both few many much such own same other only also again one two
please give write make tell explain me s t""".split())


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def ngrams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def content(text: str) -> frozenset[str]:
    return frozenset(w for w in words(text) if w not in STOP)


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


# ---------------------------------------------------------------------------------------------------
# Math word problems: each returns (prompt, answer or None); numbers from the seeded RNG
# ---------------------------------------------------------------------------------------------------

def _money(x: float) -> str:
    return f"${x:,.2f}" if x != int(x) else f"${int(x):,}"


def _name(rng, other: str | None = None) -> tuple[str, str, str]:
    n = rng.choice([x for x in NAMES if x != other])
    return (n, "she", "her") if n in SHE else (n, "he", "his")


def m_discount(rng):
    item, lo, hi = rng.choice(ITEMS_PRICED)
    p, d = rng.randrange(lo, hi, 5), rng.choice([10, 15, 20, 25, 30, 40])
    v = rng.randrange(3)
    if v == 0:
        return f"{item.capitalize()} costs {_money(p)} and is on sale for {d}% off. How much do you pay?", _money(p * (1 - d / 100))
    n, _, _ = _name(rng)
    if v == 1:
        return (f"{n} buys {item} marked {_money(p)}. The store takes {d}% off at the register. "
                "What is the final price, and how much did " + n + " save?"), _money(p * (1 - d / 100))
    t = rng.choice([5, 8, 10])
    return (f"{item.capitalize()} costs {_money(p)}. It is {d}% off this week, and then a {t}% sales tax is added "
            "to the sale price. What is the final price?"), _money(round(p * (1 - d / 100) * (1 + t / 100), 2))


def m_percent_change(rng):
    a = rng.choice([40, 50, 80, 120, 150, 200, 250, 400, 500, 800, 1200, 2500])
    pct = rng.choice([-30, -25, -20, -10, 5, 10, 15, 20, 25, 30, 40, 50, 60])
    b = int(a * (1 + pct / 100))
    v = rng.randrange(3)
    if v == 0 and pct > 0:
        return f"A village had {a * 10:,} residents in 2010 and {b * 10:,} in 2020. By what percent did its population grow?", f"{pct}%"
    if v == 1:
        return f"A bakery sold {a} loaves last month and {b} this month. What is the percentage change, and is it an increase or a decrease?", f"{pct}%"
    return f"A website had {a:,} visitors on Monday and {b:,} on Tuesday. By what percent did the number of visitors change?", f"{pct}%"


def m_speed(rng):
    v = rng.randrange(3)
    if v == 0:
        h = rng.choice([2, 3, 4, 5])
        s = rng.choice([60, 75, 80, 90, 110, 120])
        return f"A train travels {s * h} km in {h} hours. What is its average speed?", f"{s} km/h"
    if v == 1:
        n, she, _ = _name(rng)
        v1, t1, v2, t2 = rng.choice([50, 60, 80]), rng.choice([1, 2, 3]), rng.choice([90, 100, 120]), rng.choice([1, 2])
        return (f"{n} drives at {v1} km/h for {t1} hour{'s' * (t1 > 1)} and then at {v2} km/h for {t2} hour{'s' * (t2 > 1)}. "
                f"How far does {she} travel in total, and what is {'her' if she == 'she' else 'his'} average speed?"), f"{v1 * t1 + v2 * t2} km"
    d, s = rng.choice([18, 24, 30, 36, 45]), rng.choice([12, 15, 18, 20])
    return f"How long does it take to cycle {d} km at a steady {s} km/h? Give the answer in hours and minutes.", None


def m_unit_price(rng):
    thing = rng.choice(["batteries", "yogurt cups", "granola bars", "pens", "rolls of toilet paper", "tennis balls"])
    n1, n2 = rng.choice([(4, 10), (6, 15), (8, 20), (3, 8), (12, 30)])
    p1 = rng.choice([3.6, 4.2, 5.0, 2.4, 6.0])
    p2 = round(p1 / n1 * n2 * rng.choice([0.85, 0.9, 1.05, 1.1]), 2)
    return (f"{'An' if n1 in (8, 11, 18) else 'A'} {n1}-pack of {thing} costs {_money(p1)}, and a {n2}-pack costs {_money(p2)}. "
            "Which is the better deal per item, and by how much?"), None


def m_recipe(rng):
    s1, s2 = rng.choice([(4, 6), (4, 10), (6, 9), (8, 12), (2, 5), (6, 15)])
    q = rng.choice([(1.5, "cups of flour"), (2, "cups of milk"), (3, "eggs"), (250, "grams of pasta"),
                    (0.75, "cups of sugar"), (400, "grams of tomatoes")])
    amount = q[0] * s2 / s1
    return (f"A recipe for {s1} servings uses {q[0]:g} {q[1]}. How much do I need to make {s2} servings?",
            f"{amount:g} {q[1]}")


def m_work_rate(rng):
    a, b = rng.choice([(3, 6), (4, 12), (2, 3), (6, 12), (5, 20), (10, 15), (4, 6)])
    t = a * b / (a + b)
    if rng.random() < 0.5:
        return (f"One pipe fills a tank in {a} hours, and a second pipe fills it in {b} hours. "
                "If both pipes run together, how long does it take to fill the tank?"), f"{t:g} hours"
    n1, _, _ = _name(rng)
    n2, _, _ = _name(rng, n1)
    return (f"{n1} can paint a fence in {a} hours, and {n2} can paint the same fence in {b} hours. "
            "How long will it take them working together?"), f"{t:g} hours"


def m_average(rng):
    n, she, _ = _name(rng)
    scores = [rng.randrange(70, 96) for _ in range(rng.choice([3, 4]))]
    target = rng.choice([80, 82, 85, 88])
    need = target * (len(scores) + 1) - sum(scores)
    if not 50 <= need <= 100:
        need = None
    return (f"{n}'s test scores so far are {', '.join(map(str, scores))}. What score does {she} need on the next "
            f"test to bring the average up to {target}?"), (str(need) if need is not None else None)


def m_interest(rng):
    P, r, t = rng.choice([500, 1000, 2000, 2500, 5000]), rng.choice([2, 3, 4, 5, 6]), rng.choice([2, 3, 4, 5])
    if rng.random() < 0.5:
        return (f"If you put {_money(P)} in a savings account that pays {r}% simple interest per year, how much interest "
                f"will you earn in {t} years?"), _money(P * r * t / 100)
    return (f"{_money(P)} is invested at {r}% interest, compounded once a year. How much will it be worth after {t} "
            "years? Show the calculation."), _money(round(P * (1 + r / 100) ** t, 2))


def m_garden(rng):
    L, W = rng.randrange(6, 25), rng.randrange(3, 12)
    if rng.random() < 0.5:
        return (f"A rectangular garden is {L} m long and {W} m wide. How much fencing do I need to go all the way around "
                "it, and what is its area?"), f"{2 * (L + W)} m"
    c = rng.choice([18, 25, 32, 40])
    return (f"A room measures {L} m by {W} m. Floor tiles cost {_money(c)} per square meter. How much will it cost "
            "to tile the whole floor?"), _money(L * W * c)


def m_ages(rng):
    n1, _, _ = _name(rng)
    n2, _, _ = _name(rng, n1)
    young, diff = rng.randrange(8, 30), rng.randrange(2, 15)
    return (f"The sum of {n1}'s and {n2}'s ages is {2 * young + diff}, and {n1} is {diff} years older than {n2}. "
            "How old is each of them?"), f"{young + diff} and {young}"


def m_bill(rng):
    n, b, tip = rng.choice([3, 4, 5, 6]), rng.randrange(60, 240, 4), rng.choice([10, 15, 18, 20])
    return (f"Dinner for {n} people costs {_money(b)}. They add a {tip}% tip and split the total evenly. "
            "How much does each person pay?"), _money(round(b * (1 + tip / 100) / n, 2))


def m_currency(rng):
    cur, r = rng.choice([("euro", 1.05), ("euro", 1.08), ("euro", 1.12), ("pound", 1.25), ("pound", 1.3)])
    x = rng.choice([150, 200, 350, 500, 1200])
    return (f"If 1 {cur} is worth {r} US dollars, how many {cur}s will I get for {_money(x)}? Round to the nearest cent."),\
        f"{x / r:.2f} {cur}s"


def m_consecutive(rng):
    k = rng.randrange(10, 90)
    if rng.random() < 0.5:
        return f"The sum of three consecutive whole numbers is {3 * k + 3}. What are the numbers?", f"{k}, {k + 1}, {k + 2}"
    return f"Two consecutive even numbers add up to {4 * k + 2}. What are they?", f"{2 * k} and {2 * k + 2}"


def m_ratio(rng):
    n1, _, _ = _name(rng)
    n2, _, _ = _name(rng, n1)
    a, b = rng.choice([(2, 3), (3, 5), (1, 4), (3, 4), (5, 7)])
    t = (a + b) * rng.randrange(10, 60)
    return f"{n1} and {n2} share {_money(t)} in the ratio {a}:{b}. How much does each of them get?",\
        f"{_money(t * a // (a + b))} and {_money(t * b // (a + b))}"


def m_pizza(rng):
    d1, d2 = rng.choice([(16, 10), (18, 12), (14, 9), (16, 11)])
    return (f"Which gives you more pizza: one {d1}-inch pizza or two {d2}-inch pizzas? Explain using the areas."), None


def m_volume(rng):
    L, W, H = rng.choice([60, 80, 100, 120]), rng.choice([30, 40, 50]), rng.choice([35, 40, 50, 60])
    return (f"A fish tank is {L} cm long, {W} cm wide, and {H} cm tall. How many liters of water does it hold when it "
            "is full?"), f"{L * W * H // 1000} liters"


def m_savings(rng):
    n, she, her = _name(rng)
    item, lo, hi = rng.choice(ITEMS_PRICED)
    c = rng.randrange(max(lo, 100), hi + 150, 10)
    s, w = rng.randrange(10, 60, 5), rng.choice([15, 20, 25, 30])
    weeks = -(-(c - s) // w)
    return (f"{n} wants to buy {item} that costs {_money(c)}. {she.capitalize()} has {_money(s)} saved and can put "
            f"aside {_money(w)} a week. How many weeks until {she} can afford it?"), f"{weeks} weeks"


def m_think_number(rng):
    x, a, b = rng.randrange(3, 30), rng.choice([3, 4, 5, 6, 7]), rng.randrange(2, 40)
    return f"I'm thinking of a number. If I multiply it by {a} and then add {b}, I get {a * x + b}. What is my number?", str(x)


def m_fuel(rng):
    l, d, p = rng.choice([5.5, 6, 7.5, 8]), rng.choice([240, 350, 420, 600]), rng.choice([1.6, 1.75, 1.9])
    return (f"My car uses {l:g} liters of fuel per 100 km. How much fuel do I need for a {d} km trip, and what will "
            f"it cost if fuel is {_money(p)} per liter?"), f"{l * d / 100:g} liters"


def m_wage(rng):
    n, she, _ = _name(rng)
    w, h = rng.choice([14, 16, 18, 20, 22]), rng.choice([44, 45, 48, 50])
    pay = 40 * w + (h - 40) * w * 1.5
    return (f"{n} earns {_money(w)} an hour and gets 1.5 times that rate for every hour over 40 in a week. How much "
            f"does {she} earn in a week when {she} works {h} hours?"), _money(pay)


def m_buses(rng):
    a, b = rng.choice([(12, 18), (15, 20), (8, 12), (10, 25), (14, 21)])
    return (f"One bus leaves the station every {a} minutes and another every {b} minutes. If both leave at 8:00 a.m., "
            "when will they next leave at the same time?"), None


def m_probability(rng):
    if rng.random() < 0.5:
        r, b, g = rng.randrange(2, 9), rng.randrange(2, 9), rng.randrange(1, 7)
        return (f"A bag holds {r} red, {b} blue, and {g} green marbles. If you pick one without looking, what is the "
                "probability that it is not blue?"), f"{r + g}/{r + b + g}"
    s = rng.choice([4, 5, 7, 8, 9, 10, 11])
    return f"If you roll two fair six-sided dice, what is the probability that they add up to {s}?", None


def m_clock(rng):
    h, m, d = rng.randrange(1, 12), rng.choice([0, 10, 15, 20, 30, 45, 50]), rng.choice([95, 107, 118, 135, 142])
    return f"A movie starts at {h}:{m:02d} p.m. and lasts {d} minutes. What time does it end?", None


def m_polygon(rng):
    n, name = rng.choice([(5, "pentagon"), (6, "hexagon"), (8, "octagon"), (10, "decagon"), (12, "dodecagon")])
    return f"What is the sum of the interior angles of a {name}? How big is each angle if the {name} is regular?",\
        f"{(n - 2) * 180} degrees"


def m_change(rng):
    n, she, _ = _name(rng)
    a, p1, b, p2 = rng.randrange(2, 6), rng.choice([2.5, 3.25, 4.0, 1.75]), rng.randrange(2, 8), rng.choice([0.8, 1.2, 1.5])
    total = a * p1 + b * p2
    bill = 20 if total < 20 else 50
    return (f"{n} buys {a} notebooks at {_money(p1)} each and {b} pens at {_money(p2)} each, and pays with a "
            f"{_money(bill)} bill. How much change does {she} get?"), _money(round(bill - total, 2))


def m_mixture(rng):
    v, c1, c2 = rng.choice([4, 5, 6, 10]), rng.choice([40, 50, 60]), rng.choice([20, 25, 30])
    return (f"How many liters of water must be added to {v} liters of a juice drink that is {c1}% juice to bring it "
            f"down to {c2}% juice?"), f"{v * c1 / c2 - v:g} liters"


def m_handshake(rng):
    n = rng.randrange(6, 25)
    return f"At a meeting, each of the {n} people shakes hands once with every other person. How many handshakes are there?",\
        str(n * (n - 1) // 2)


MATH = [m_discount, m_percent_change, m_speed, m_unit_price, m_recipe, m_work_rate, m_average, m_interest,
        m_garden, m_ages, m_bill, m_currency, m_consecutive, m_ratio, m_pizza, m_volume, m_savings,
        m_think_number, m_fuel, m_wage, m_buses, m_probability, m_clock, m_polygon, m_change, m_mixture]


# ---------------------------------------------------------------------------------------------------
# Candidates per kind: (category, template id, topic id, prompt)
# ---------------------------------------------------------------------------------------------------

def _q(s: str) -> str:
    return f'"{s}"'


def _maybe(rng, text: str, p: float = 0.3) -> str:
    """Append a constraint to a request now and then (a multi-sentence instruction)."""
    return f"{text} {rng.choice(CONSTRAINTS)}" if rng.random() < p else text


def _n(rng, choices=(3, 4, 5, 6, 7, 10)) -> tuple[int, str]:
    k = rng.choice(choices)
    return k, NUM_WORDS[k]


def gen_explanation(rng):
    out = []
    for q in WHY_QUESTIONS:
        out.append(("stem", "why", q, q))
        out.append(("stem", "why+c", q, _maybe(rng, q, 1.0)))
        out.append(("stem", "why+lead", q, rng.choice(LEAD_INS) + q[0].lower() + q[1:]))
    for d in HOW_DEVICES:
        for t, s in [("how", f"How does {d} work?"),
                     ("how-inside", f"What actually happens inside {d} when you use it?"),
                     ("how-steps", f"Can you explain, step by step, how {d} works?")]:
            out.append(("stem", t, d, _maybe(rng, s)))
    for d in HOW_SYSTEMS:
        cat = "coding" if d in ("a search engine", "public-key encryption", "Wi-Fi", "QR codes", "a spell checker",
                                "a streaming service's recommendations") else "stem"
        for t, s in [("how", f"How does {d} work?"),
                     ("how-beginner", f"Explain how {d} works to a complete beginner."),
                     ("how-misc", f"I use {d} all the time but have no idea how it works. Can you explain the basics?")]:
            if t == "how-misc" and d in ("a nuclear power plant", "carbon dating", "air traffic control",
                                         "a postal sorting center", "the electricity grid", "the immune system's memory"):
                continue
            out.append((cat, t, d, _maybe(rng, s)))
    tpls = [("c-simple", "Explain {c} in simple terms."), ("c-matter", "What is {c}, and why does it matter?"),
            ("c-analogy", "Can you explain {c} with an everyday analogy?"),
            ("c-hear", "I keep hearing about {c}. What does it actually mean?"),
            ("c-12", "Explain {c} to a twelve-year-old in one short paragraph."),
            ("c-def", "Give me a clear definition of {c}, then one real-world example."),
            ("c-myth", "What's a common misconception about {c}?")]
    for c, cat in CONCEPTS:
        for t, s in tpls:
            if c in PLURAL_CONCEPTS:
                s = s.replace("What is {c}, and why does it matter?", "What are {c}, and why do they matter?")
            out.append((cat, t, c, _maybe(rng, s.format(c=c), 0.2)))
    tpls = [("cmp-diff", "What is the difference between {a} and {b}?"),
            ("cmp-alike", "How are {a} and {b} different, and what do they have in common?"),
            ("cmp-mix", "People often mix up {a} and {b}. How can I tell them apart?"),
            ("cmp-table", "Compare {a} and {b} in a short table."),
            ("cmp-short", "In two or three sentences, explain how {a} differs from {b}.")]
    for a, b, cat in COMPARE:
        for t, s in tpls:
            out.append((cat, t, f"{a}|{b}", s.format(a=a, b=b)))
    for e in EVENTS:
        for t, s in [("ev-what", "What was {h}, and what changed because of it?"),
                     ("ev-overview", "Give me a short overview of {h} for someone who never studied it."),
                     ("ev-people", "How did {h} affect the lives of ordinary people?"),
                     ("ev-causes", "What were the main causes and effects of {h}?"),
                     ("ev-wrong", "What do people often get wrong about {h}?")]:
            out.append(("humanities", t, e, _maybe(rng, s.format(h=e), 0.2)))
    for pl in PLACES:
        for t, s in [("pl-what", "What was {h}, and why do historians find it so interesting?"),
                     ("pl-overview", "Tell me about {h} in a few sentences."),
                     ("pl-facts", "What are three surprising facts about {h}?")]:
            out.append(("humanities", t, pl, s.format(h=pl)))
    for w in WORKS:
        for t, s in [("w-themes", "What are the main themes of {w}?"), ("w-classic", "What makes {w} a classic?"),
                     ("w-why", "Why do people still read {w} today?")]:
            out.append(("humanities", t, w, s.format(w=w)))
    for f, cat in FIGURES:
        for t, s in [("f-known", "What is {p} best known for?"),
                     ("f-intro", "Give me a short introduction to {p} and one idea or work they are famous for."),
                     ("f-influence", "What influence did {p} have on the people who came after?")]:
            out.append((cat, t, f, s.format(p=f)))
    for c in CODE_CONCEPTS:
        for t, s in [("cc-when", "What is {c}, and when would I use it?"), ("cc-example", "Explain {c} with a small example."),
                     ("cc-new", "I'm new to programming. What is {c}?")]:
            out.append(("coding", t, c, s.format(c=c)))
    for p in PURPOSES:
        out.append(("summarization" if rng.random() < 0.5 else "everyday-advice", "purpose", p,
                    f"In a sentence or two, what is the point of {p}?"))
    return [("explanation",) + c for c in out]


def gen_list(rng):
    out = []
    tpls = [("t-list", "List {n} {t}."), ("t-note", "Give me {n} {t}, with a one-sentence note on each."),
            ("t-suggest", "Can you suggest {n} {t}? A bulleted list is fine."),
            ("t-some", "What are some {t}? Please keep it to a short list."),
            ("t-why", "Name {n} {t} and briefly say why you picked each one.")]
    for t, cat in THINGS:
        for tid, s in tpls:
            _, n = _n(rng, (3, 4, 5, 6, 7))
            out.append((cat, tid, t, s.format(n=n, t=t)))
    tpls = [("g-tips", "List {n} practical tips to {g}."), ("g-check", "Give me a short checklist to help me {g}."),
            ("g-mistakes", "What are {n} common mistakes people make when they try to {g}?"),
            ("g-habits", "Suggest {n} small habits that would help me {g}, one line each.")]
    for g in GOALS:
        for tid, s in tpls:
            _, n = _n(rng, (3, 4, 5, 6))
            out.append(("everyday-advice", tid, g, _maybe(rng, s.format(n=n, g=g), 0.15)))
    for e in EVENTS[:20]:
        _, n = _n(rng, (3, 4, 5))
        out.append(("humanities", "h-list", e, f"List {n} key turning points of {e}, with a year for each."))
    for c in CODE_CONCEPTS[:20]:
        _, n = _n(rng, (3, 4, 5))
        out.append(("coding", "cc-list", c, f"List {n} things a beginner should know about {c}."))
    return [("list",) + c for c in out]


def gen_advice(rng):
    out = []
    tpls = [("a-how", "How can I {g}?"), ("a-best", "What's the best way to {g}?"),
            ("a-fail", "I want to {g}, but I never seem to manage it. What would you suggest?"),
            ("a-time", "Any tips to {g}? I need something I can realistically stick to."),
            ("a-today", "What's one thing I could do today to {g}? And what should I do after that?"),
            ("a-where", "Where should I start if I want to {g}?")]
    for g in GOALS:
        for tid, s in tpls:
            out.append(("everyday-advice", tid, g, _maybe(rng, s.format(g=g), 0.2)))
    return [("advice",) + c for c in out]


def gen_instruction(rng):
    out = []
    for d in DIETS:
        for k in (4, 6, 8):
            out.append(("everyday-advice", "dinner", f"{d}|{k}",
                        f"I'm hosting dinner for {k} people, and {d}. Suggest a three-course menu and a rough shopping list."))
    for c in CITIES:
        days, season = rng.choice([2, 3, 4, 5]), rng.choice(["", " in early spring", " in December", " in July", " in autumn"])
        out.append(("everyday-advice", "itinerary", c,
                    f"I have {days} days in {c}{season}. Plan a relaxed itinerary with one landmark or museum and one "
                    "outdoor activity each day."))
    for t in (2, 3, 4, 5):
        for m in (20, 30, 45):
            extra = rng.choice(["", " and I'm a complete beginner", " and I'd like to improve my balance",
                                " and I live in a small apartment, so no jumping"])
            out.append(("everyday-advice", "workout", f"{t}|{m}",
                        f"Write a weekly exercise plan for someone who can work out {t} times a week for about {m} minutes. "
                        f"I have no equipment at home{extra}."))
    for who, why in EMAILS:
        w = rng.choice([100, 120, 150])
        out.append(("writing", "email", why, f"Draft an email to {who} {why}. Keep it polite and under {w} words."))
        out.append(("writing", "email2", why,
                    f"Write a short, friendly email to {who} {why}. Give it a clear subject line."))
    for topic, aud in TALKS:
        m = rng.choice([5, 10, 15, 20])
        out.append(("writing", "talk", topic, f"I'm giving a {m}-minute talk on {topic} to {aud}. Suggest an outline "
                                              "with an opening hook and three main points."))
    for e in EXAMS:
        w, h = rng.choice([3, 4, 6, 8]), rng.choice([1, 2, 3])
        out.append(("everyday-advice", "study", e, f"Create a study plan for the next {w} weeks. I'm preparing for {e} "
                                                   f"and can study about {h} hour{'s' * (h > 1)} a day. Include review days."))
    for i, job in enumerate(JOBS):
        for j in range(2):
            plat, hob = PLATFORMS[(i + j) % len(PLATFORMS)], HOBBIES[(3 * i + j) % len(HOBBIES)]
            art = "an" if job[0] in "aeiou" else "a"
            out.append(("writing", "bio", f"{job}|{plat}",
                        f"Help me write a short bio for {plat}. I'm {art} {job} who enjoys {hob}. Keep it warm and under "
                        f"{rng.choice([50, 60, 80])} words."))
    for occ in OCCASIONS:
        amt = rng.choice([150, 200, 300, 500, 800])
        out.append(("everyday-advice", "budget", occ, f"My budget for {occ} is ${amt}. Suggest how to split it between "
                                                      "food, decorations, and activities, and add one money-saving tip."))
    for b in BUSINESSES:
        _, n = _n(rng, (5, 6, 8, 10))
        out.append(("writing", "names", b, f"I'm opening {b}. Suggest {n} possible names and explain the idea behind each one."))
    for p, feat in PRODUCTS:
        out.append(("writing", "product", p, f"Write a product description for {p}: {feat}. "
                                             "Keep it under 80 words and end with a short call to action."))
    for topic, aud in EXPLAIN_TO:
        out.append(("writing", "explain-to", topic, f"I need to explain {topic} to {aud}. Write three short paragraphs: "
                                                    "what it is, why it matters to them, and one thing they can do."))
    for act, grp in TRIPS:
        d = rng.choice([2, 3, 4])
        out.append(("everyday-advice", "trip", f"{act}|{grp}", f"Plan a {d}-day {act} trip for {grp}. Include what to pack "
                                                                "and a backup plan for bad weather."))
    for who, what in DECLINE:
        out.append(("writing", "decline", what, f"Write a polite message to {who} declining {what}. Give a brief reason "
                                                "and suggest an alternative."))
    for h in NEW_HOBBIES:
        out.append(("everyday-advice", "hobby", h, f"I want to get into {h}. What gear do I need, roughly how much will it "
                                                   "cost, and how should I spend my first month?"))
    for w in WORKS[:16]:
        out.append(("humanities", "bookclub", w, f"I'm leading a book club discussion on {w}. Write five open-ended "
                                                 "questions that will get people talking, and a one-line note on why each works."))
    for e in EVENTS[:16]:
        out.append(("humanities", "lesson", e, f"Plan a 45-minute lesson on {e} for 14-year-olds. Include a warm-up "
                                               "question, a short activity, and one homework task."))
    return [("instruction",) + c for c in out]


def gen_rewrite(rng):
    out = []
    banks = [
        (CASUAL, "writing", [("formal", "Rewrite this message so it sounds professional: {s}"),
                             ("formal-mgr", "Make this more formal for an email to my manager: {s}"),
                             ("formal-polite", "Turn this text into a polite workplace message: {s}")]),
        (STIFF, "writing", [("plain", "Rewrite this in plain, friendly language: {s}"),
                            ("warm", "This notice sounds cold. Can you make it warmer without changing the meaning? {s}"),
                            ("friend", "Say this the way you would say it to a friend: {s}")]),
        (ERRORS, "writing", [("grammar", "Fix the grammar and spelling in this sentence: {s}"),
                             ("grammar-why", "Correct the mistakes in this sentence and briefly explain each fix: {s}"),
                             ("proof", "Can you proofread this for me? {s}")]),
        (PASSIVE, "writing", [("active", "Rewrite this sentence in the active voice: {s}"),
                              ("active-who", "Change this to the active voice, and tell me who is doing the action: {s}")]),
        (WORDY, "writing", [("short", "Make this sentence shorter without changing its meaning: {s}"),
                            ("cut", "Cut the unnecessary words from this sentence: {s}"),
                            ("twelve", "Rewrite this in twelve words or fewer: {s}")]),
        (PROCEDURES, "extraction", [("steps", "Rewrite these instructions as numbered steps: {s}"),
                                    ("checklist", "Turn this into a short checklist: {s}")]),
        (JARGON, "writing", [("jargon", "Translate this into plain English: {s}"),
                             ("jargon-mean", "What does this mean in everyday language? {s}"),
                             ("jargon-teen", "Rewrite this so a teenager would understand it: {s}")]),
        (REVIEWS, "writing", [("review-bal", "Rewrite this review so it sounds more balanced and constructive: {s}"),
                              ("review-msg", "Turn this complaint into a polite message to the company: {s}")]),
        (PLAIN, "writing", [("vivid", "Rewrite this sentence so it is more vivid and descriptive: {s}"),
                            ("expand", "Expand this sentence into a short descriptive paragraph: {s}"),
                            ("tones", "Rewrite this sentence in three tones, cheerful, gloomy, and suspenseful: {s}")]),
        (PASSAGES[:12], "writing", [("kid", "Rewrite this for a seven-year-old: {s}"),
                                    ("tweet", "Turn this into a short social media post of under 40 words: {s}")]),
    ]
    for bank, cat, tpls in banks:
        for s in bank:
            for tid, t in tpls:
                out.append((cat, tid, s, t.format(s=_q(s))))
    return [("rewrite",) + c for c in out]


def gen_math(rng):
    out = []
    for f in MATH:
        for i in range(14):
            text, _ = f(rng)
            out.append(("math", f.__name__, f"{f.__name__}:{i}", text))
    return [("math-word-problem",) + c for c in out]


def _task(task: str, seq: str) -> str:
    return task.format(seq=seq).replace(" a array", " an array")


def gen_code(rng):
    out = []
    tpls = [("fn", "Write a {lang} function that {task}."),
            ("fn-ex", "Write a {lang} function that {task}. Include a short example of calling it."),
            ("fn-how", "Can you show me how to write a {lang} function that {task}? Please explain the logic briefly."),
            ("fn-readable", "I need a {lang} function that {task}. Keep it readable and add a few comments."),
            ("fn-tests", "Write a {lang} function that {task}, then give two test cases that check it."),
            ("fn-edge", "What's a clean way to write a {lang} function that {task}? Mention any edge cases.")]
    for task in CODE_TASKS:
        for tid, t in tpls:
            lang, seq = rng.choices(LANGS, LANG_WEIGHTS)[0]
            out.append(("coding", tid, task, t.format(lang=lang, task=_task(task, seq))))
    for schema, tasks in SQL_TASKS:
        for task in tasks:
            out.append(("coding", "sql", task, f"Given a table {schema}, write a SQL query that {task}."))
            out.append(("coding", "sql2", task, f"Write a SQL query that {task}. The table is {schema}. "
                                                "Explain what each clause does."))
    for lang, snip, symptom in BUGS:
        out.append(("coding", "bug", snip, f"Why does this {lang} code {symptom}?\n\n{snip}"))
        out.append(("coding", "bug-fix", snip, f"This {lang} code doesn't do what I expect:\n\n{snip}\n\n"
                                               "What's wrong, and how do I fix it?"))
    for a, b, cat in COMPARE:
        if cat == "coding":
            out.append(("coding", "cmp-code", f"{a}|{b}", f"When should I use {a} and when {b}? Give a short example of each."))
    return [("code",) + c for c in out]


def gen_followup(rng):
    out = []
    hand = [
        "You told me bananas are technically berries but strawberries aren't. That sounds backwards. Can you explain why?",
        "Earlier you said the Great Wall of China can't be seen from space with the naked eye. So why do so many people believe it can?",
        "You recommended that I learn touch typing. How long does it usually take to get comfortable, and what should I practice first?",
        "In your last answer you mentioned compound interest. Can you show me with real numbers how $1,000 grows over five years at 5%?",
        "You suggested the Pomodoro technique. What do I do if someone interrupts me in the middle of a session?",
        "I asked you for a vegetarian lasagna recipe earlier. Can you adapt it so it's also gluten-free?",
        "Your packing list for my hiking trip didn't mention water. How much should I carry for a six-hour hike in warm weather?",
        "You explained that vaccines train the immune system. Then why do some vaccines need booster shots?",
        "Earlier you wrote me a limerick about a goat. Can you write a second verse where the goat gets revenge?",
        "You said Python lists are mutable and tuples are not. Can you show a short example where that difference actually matters?",
        "The workout plan you gave me has squats on Monday and Thursday, but squats hurt my knees. What can I do instead?",
        "You told me to let the dough rise for an hour, but my kitchen is cold. Will it still work, and how will I know it's ready?",
        "In your summary of the Industrial Revolution you mentioned child labor. What were conditions actually like for working children?",
        "You suggested three names for my bakery: Crumb & Co., Rise Up, and The Daily Loaf. Which fits a shop that mostly sells sourdough?",
        "Thanks for the public speaking tips. What should I do if my mind goes blank in the middle of the talk?",
        "You recommended Pride and Prejudice as my first classic novel. What should I pay attention to while reading it?",
        "Going back to the email you drafted to my landlord: can you make it firmer? The heating still isn't fixed after two weeks.",
        "You explained photosynthesis really well. Now can you explain how it's different from respiration in plants?",
        "Earlier you said octopuses have three hearts. What does each of the hearts do?",
        "Following up on the budget you made for me: my rent just went up by $150 a month. Where should I cut back?",
        "You helped me plan a trip to Lisbon. Can you add a cheap day trip I can reach by train?",
        "The SQL query you gave me returns duplicate rows. How do I get rid of them?",
        "You said I should water my succulent every two weeks, but its leaves are getting soft and mushy. What does that mean?",
        "You listed five stretches for my back. Can you tell me how long to hold each one and how often to do them?",
        "Earlier you told me that Pluto is no longer a planet. Who decided that, and why?",
        "You translated my sentence into Spanish using 'usted'. When should I use 'tú' instead?",
        "You suggested I open a high-yield savings account. What should I look out for when choosing one?",
        "Thanks for the story about the dragon. Can you continue it with a second chapter where the dragon meets a knight?",
    ]
    for h in hand:
        out.append(("everyday-advice" if "budget" in h or "workout" in h else "writing", "hand", h, h))
    for c, cat in CONCEPTS:
        out.append((cat, "fu-analogy", c, f"That explanation of {c} went over my head. Can you try again using an analogy "
                                          f"about {rng.choice(ANALOGY_DOMAINS)}?"))
        out.append((cat, "fu-test", c, f"Thanks for explaining {c}. Can you give me a real-world example and one question "
                                       "I could use to check that I understood it?"))
    for g in GOALS:
        out.append(("everyday-advice", "fu-setback", g, f"Following up on my question about how to {g}: I tried your "
                                                        f"suggestions for a week, but {rng.choice(SETBACKS)}. What should I change?"))
        out.append(("everyday-advice", "fu-one", g, f"You gave me a list of tips to {g}. If I can only start with one, "
                                                    "which should it be and why?"))
    for task in CODE_TASKS:
        lang, seq = rng.choices(LANGS, LANG_WEIGHTS)[0]
        out.append(("coding", "fu-code", task, f"Thanks for the {lang} function that {_task(task, seq)}. How would I "
                                               f"change it so that it {rng.choice(CODE_EXTENSIONS)}?"))
    for form, _ in CREATIVE_FORMS:
        for subj in rng.sample(CREATIVE_SUBJECTS, 4):
            out.append(("writing", "fu-creative", f"{form}|{subj}", f"I asked you for {form} about {subj}. Now rewrite "
                                                                    f"it so that it {rng.choice(CREATIVE_MODS)}."))
    for f in MATH:
        for _ in range(4):
            text, ans = f(rng)
            if ans is None or len(text) > 230:
                continue
            wrong = _wrong(rng, ans)
            out.append(("math", "fu-math", text, f"Here is a problem I asked you earlier: {_q(text)} You answered {wrong}, "
                                                 "but I'm not sure that's right. Can you go through it again step by step?"))
    for e in EVENTS:
        out.append(("humanities", "fu-history", e, f"We were just talking about {e}. What happened right after it, and how "
                                                   "did it shape the following decades?"))
    for c in rng.sample(CITIES, 12):
        out.append(("everyday-advice", "fu-trip", c, f"You planned a {rng.choice([3, 4, 5])}-day trip to {c} for me, but "
                                                     "now the forecast says rain on day two. What indoor plans could replace "
                                                     "the outdoor ones?"))
    for s in CASUAL:
        out.append(("writing", "fu-rewrite", s, f"I asked you to make this message more formal: {_q(s)} Your version was "
                                                "too stiff. Can you make it polite but still relaxed?"))
    for t, cat in THINGS:
        _, n = _n(rng, (4, 5, 6))
        out.append((cat, "fu-rank", t, f"You gave me {n} {t}. Can you rank them and explain why the top one is first?"))
    for a, b, cat in COMPARE:
        out.append((cat, "fu-remember", f"{a}|{b}", f"Following up on {a} versus {b}: is there a simple trick to "
                                                    "remember which is which?"))
    return [("follow-up",) + c for c in out]


def _wrong(rng, ans: str) -> str:
    """A plausible wrong answer: the first number in `ans` nudged."""
    m = re.search(r"\d[\d,]*(\.\d+)?", ans)
    num = float(m.group(0).replace(",", ""))
    new = num + rng.choice([-1, 1]) * max(1, round(abs(num) * rng.choice([0.1, 0.2, 0.5])))
    s = f"{new:,.2f}" if "." in m.group(0) else f"{int(new):,}" if "," in m.group(0) else f"{int(new)}"
    return ans[:m.start()] + s + ans[m.end():]


def gen_creative(rng):
    out = []
    tpls = [("cr", "Write {form} about {subj}."), ("cr-vivid", "Write {form} about {subj}. Use vivid details."),
            ("cr-funny", "Could you write {form} about {subj}? I'd like it to be a little funny."),
            ("cr-pov", "Write {form} about {subj}, told from an unexpected point of view."),
            ("cr-twist", "Write {form} about {subj} that ends with a surprise.")]
    for form, _ in CREATIVE_FORMS:
        for subj in CREATIVE_SUBJECTS:
            tid, t = rng.choice(tpls)
            out.append(("writing", tid, f"{form}|{subj}", t.format(form=form, subj=subj)))
    for who, hobby in REL_PEOPLE:
        out.append(("writing", "bday", who, f"Write a short birthday message for {who}, who loves {hobby}."))
        out.append(("writing", "bday-poem", who, f"Write a funny four-line birthday poem for {who}, who is obsessed with {hobby}."))
    for who, what in THANKS:
        out.append(("writing", "thanks", what, f"Write a thank-you note to {who} for {what}."))
    for ev in EVENTS_SPEECH:
        out.append(("writing", "toast", ev, f"Write a short toast for {ev}. It should be warm, a little funny, and under "
                                            "a minute long."))
    for subj in CREATIVE_SUBJECTS[:20]:
        out.append(("writing", "title", subj, f"Suggest five titles for a short story about {subj}, and pick your favorite."))
    return [("creative",) + c for c in out]


def gen_roleplay(rng):
    out = []
    tpls = [("rp-pretend", "Pretend you are {role} {act}."), ("rp-stay", "You are {role}. Stay in character while {act}."),
            ("rp-act", "Act as {role} {act}. Keep it under 150 words."),
            ("rp-role", "Role-play this: you are {role}, and you are {act}.")]
    for role, acts in ROLES:
        for act in acts:
            for tid, t in tpls:
                out.append(("roleplay", tid, f"{role}|{act}", t.format(role=role, act=act)))
    return [("roleplay",) + c for c in out]


_ADJ = [("taller", "tallest", "shortest"), ("older", "oldest", "youngest"), ("faster", "fastest", "slowest")]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def gen_reasoning(rng):
    out = []
    for a, b, c in SYLLOGISMS:
        out.append(("reasoning", "syl-some", a, f"All {a} are {b}. Some {b} {c}. Does it follow that some of {a} {c}? Explain."))
        out.append(("reasoning", "syl-none", a, f"None of {a} {c}, and all of {a} are {b}. Does that mean no {b} {c}? "
                                                "Explain your reasoning."))
    for i in range(40):
        names = rng.sample(NAMES, 4)
        adj, sup, least = rng.choice(_ADJ)
        facts = [f"{names[0]} is {adj} than {names[1]}", f"{names[1]} is {adj} than {names[2]}",
                 f"{names[3]} is {adj} than {names[0]}"]
        rng.shuffle(facts)
        q = rng.choice([f"Who is the {sup}?", f"Who is the {least}?", f"Is {names[3]} {adj} than {names[2]}?"])
        out.append(("reasoning", "order", str(i), ". ".join(facts) + f". {q} Explain how you know."))
    for i in range(30):
        kind = rng.randrange(4)
        a = rng.randrange(2, 12)
        if kind == 0:
            d = rng.randrange(3, 12)
            seq = [a + d * k for k in range(5)]
        elif kind == 1:
            r = rng.choice([2, 3])
            seq = [a * r ** k for k in range(5)]
        elif kind == 2:
            seq = [(a + k) ** 2 for k in range(5)]
        else:
            seq = [a, a + 1]
            for _ in range(3):
                seq.append(seq[-1] + seq[-2])
        out.append(("reasoning", "seq", str(seq), f"What number comes next in the sequence {', '.join(map(str, seq))}, ...? "
                                                  "Explain the pattern."))
    for i in range(20):
        k, m = rng.randrange(2, 6), rng.randrange(3, 30)
        day = rng.choice(_DAYS)
        out.append(("reasoning", "days", f"{k}|{m}|{day}", f"If {k} days ago was a {day}, what day of the week will it be "
                                                          f"{m} days from today? Show your reasoning."))
    for i in range(15):
        text, _ = m_handshake(rng)
        out.append(("reasoning", "handshake", text, text))
    for arg in ARGUMENTS:
        out.append(("reasoning", "flaw", arg, f"What is wrong with this reasoning? {_q(arg)}"))
        out.append(("reasoning", "flaw2", arg, f"Is this argument convincing? Point out any logical problems: {_q(arg)}"))
    for s in ALWAYS_SOMETIMES:
        out.append(("reasoning", "always", s, f"Is this statement always, sometimes, or never true? Explain with examples: {_q(s)}"))
    for p in CLASSIC_PUZZLES:
        out.append(("reasoning", "puzzle", p, p))
    return [("reasoning",) + c for c in out]


_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]


def _date(rng) -> str:
    return f"{rng.choice(_MONTHS)} {rng.randrange(1, 29)}, {rng.randrange(1950, 2024)}"


def gen_extraction(rng):
    out = []
    orgs = ["The community choir", "The bike club", "Our family bakery", "The local theater group", "The chess society",
            "The robotics team", "The neighborhood library", "The surf school"]
    for i, org in enumerate(orgs):
        d = sorted([_date(rng) for _ in range(3)], key=lambda s: int(s[-4:]))
        city = rng.choice(CITIES)
        text = (f"{org} was founded on {d[0]}, moved to a new home in {city} on {d[1]}, and celebrated its "
                f"{rng.choice(['hundredth concert', 'first national award', 'ten-thousandth member'])} on {d[2]}.")
        out.append(("extraction", "dates", org, f"Extract each date and the event that happened on it: {_q(text)}"))
    for i in range(14):
        place = rng.choice(["farmers' market", "hardware store", "bookshop", "bakery", "stationery shop"])
        goods = {"farmers' market": ["apples", "honey", "goat cheese", "sourdough", "flowers"],
                 "hardware store": ["nails", "a hammer", "paint", "sandpaper", "a tape measure"],
                 "bookshop": ["a cookbook", "a novel", "a map", "a notebook", "bookmarks"],
                 "bakery": ["croissants", "a rye loaf", "muffins", "a fruit tart", "cookies"],
                 "stationery shop": ["envelopes", "a fountain pen", "ink", "sticky notes", "a planner"]}[place]
        picked = rng.sample(goods, 3)
        parts = [f"{_money(rng.choice([2, 3.5, 4.25, 6, 7.8, 12, 15.5]))} for {g}" for g in picked]
        text = f"At the {place} I paid {parts[0]}, {parts[1]}, and {parts[2]}."
        t = rng.choice([("prices", "Extract each item and its price, then give the total: {s}"),
                        ("price-table", "Make a two-column table of the items and prices in this sentence: {s}")])
        out.append(("extraction", t[0], text, t[1].format(s=_q(text))))
    rooms, topics = ["Room 204", "the main hall", "the small meeting room", "the cafeteria"], \
        ["the new website", "the summer schedule", "next year's budget", "the customer survey results"]
    for i in range(14):
        n1, n2 = rng.sample(NAMES, 2)
        day, room, topic = rng.choice(_DAYS[:5]), rng.choice(rooms), rng.choice(topics)
        time = f"{rng.choice([9, 10, 11, 1, 2, 3])}:{rng.choice(['00', '30'])}"
        thing = rng.choice(["the sales figures", "your laptops", "printed copies of the draft", "ideas for the launch"])
        text = (f"Hi team, let's meet on {day} at {time} in {room} to go over {topic}. {n1} and {n2}, please bring {thing}.")
        t = rng.choice([("meeting", "From this message, extract the meeting day, time, place, and topic: {s}"),
                        ("meeting-who", "Who has to bring something to this meeting, and what? {s}")])
        out.append(("extraction", t[0], text, t[1].format(s=_q(text))))
    for i in range(12):
        n, she, _ = _name(rng)
        job, city = rng.choice(JOBS), rng.choice(CITIES)
        langs = rng.sample(["English", "Portuguese", "Arabic", "Japanese", "French", "Swahili", "Hindi", "German"], 2)
        age = rng.randrange(22, 70)  # "a 22-year-old" … "a 69-year-old": never "an"
        text = f"{n} is a {age}-year-old {job} from {city} who speaks {langs[0]} and {langs[1]}."
        out.append(("extraction", "json", text, "Turn this into a JSON object with the keys name, age, job, city, and "
                                                f"languages: {_q(text)}"))
    for i in range(10):
        n, she, _ = _name(rng)
        c1, c2, c3 = rng.sample(CITIES, 3)
        text = (f"{n} flew from {c1} to {c2} on {rng.choice(_MONTHS)} {rng.randrange(1, 20)}, flew on to {c3} two "
                f"days later, and went home a week after that.")
        t = rng.choice([("travel", "List the cities in the order " + n + " visited them: {s}"),
                        ("travel-dates", "Extract every place and date in this text: {s}")])
        out.append(("extraction", t[0], text, t[1].format(s=_q(text))))
    ingredients = [("two cups", "flour"), ("half a cup", "melted butter"), ("three tablespoons", "sugar"),
                   ("one cup", "oats"), ("a cup", "milk"), ("a handful", "chopped walnuts"), ("two tablespoons", "honey"),
                   ("one cup", "grated carrot"), ("a teaspoon", "cinnamon"), ("half a cup", "yogurt"),
                   ("a tablespoon", "lemon juice"), ("a pinch", "salt"), ("150 grams", "dark chocolate chips")]
    for i in range(10):
        (q0, i0), (q1, i1), (q2, i2), (q3, i3) = rng.sample(ingredients, 4)
        text = f"Mix {q0} of {i0} with {q1} of {i1}, stir in {q2} of {i2}, and finish with {q3} of {i3}."
        out.append(("extraction", "recipe", text, f"List the ingredients and their quantities from this recipe step: {_q(text)}"))
    teams = ["the Harbor Hawks", "Riverside United", "the Mountain Goats", "City Rovers", "the Lakeside Lions",
             "North End FC", "the Valley Comets", "Old Town Athletic"]
    for i in range(10):
        t = rng.sample(teams, 4)
        s1, s2, d = rng.randrange(1, 5), rng.randrange(0, 3), rng.randrange(0, 4)
        if s1 <= s2:
            s1 = s2 + 1
        text = f"{t[0]} beat {t[1]} {s1}-{s2} on Saturday, while {t[2]} and {t[3]} drew {d}-{d} on Sunday."
        text = text[0].upper() + text[1:]
        tt = rng.choice([("scores", "Extract each match and its final score: {s}"),
                         ("wdl", "Which teams won, which lost, and which drew? {s}")])
        out.append(("extraction", tt[0], text, tt[1].format(s=_q(text))))
    for p, feat in PRODUCTS:
        cols = rng.sample(["black", "sand", "forest green", "navy", "coral", "gray"], 2)
        text = (f"Our {p[2:]} comes in {cols[0]} and {cols[1]}, costs {_money(rng.choice([19, 24.99, 35, 49, 89]))}, "
                f"and ships within {rng.choice([2, 3, 5])} business days. {feat[0].upper() + feat[1:]}.")
        out.append(("extraction", "specs", p, f"Pull out the colors, price, and shipping time from this product blurb: {_q(text)}"))
    for r in REVIEWS:
        out.append(("extraction", "pros-cons", r, f"Extract the positive and negative points from this review: {_q(r)}"))
    for i in range(10):
        n1, n2 = rng.sample(NAMES, 2)
        tasks = rng.sample(["update the client list", "book the venue", "order name badges", "send the agenda",
                            "check the projector", "print the handouts", "confirm the catering", "reply to the sponsor"], 3)
        day = rng.choice(_DAYS[:5])
        text = (f"Hi {n1}, could you {tasks[0]} by {day}? Also, please {tasks[1]}, and remind {n2} to {tasks[2]}.")
        out.append(("extraction", "actions", text, f"List the action items in this message and who is responsible for each: {_q(text)}"))
    for p in PASSAGES[12:]:
        out.append(("extraction", "numbers", p, f"Find every number in this text and say what it refers to: {_q(p)}")
                   if re.search(r"\d", p) else
                   ("extraction", "keywords", p, f"Pick out the five most important words in this passage: {_q(p)}"))
    return [("extraction",) + c for c in out]


def gen_summarization(rng):
    out = []
    tpls = [("s-one", "Summarize this in one sentence: {s}"), ("s-line", "Give me a one-line summary of this: {s}"),
            ("s-main", "What is the main point of this paragraph? {s}"), ("s-headline", "Write a short headline for this: {s}"),
            ("s-bullets", "Summarize this in two bullet points: {s}"), ("s-tldr", "TL;DR please: {s}"),
            ("s-busy", "I'm in a hurry. What's the key takeaway here? {s}")]
    for p in PASSAGES:
        for tid, t in rng.sample(tpls, 3):
            out.append(("summarization", tid, p, t.format(s=_q(p))))
    for tale in TALES:
        k = rng.choice(["two", "three", "four"])
        out.append(("summarization", "tale", tale, f"Summarize the story of {tale} in {k} sentences."))
        out.append(("summarization", "tale-moral", tale, f"What happens in {tale}, and what is the lesson? Keep it brief."))
    for w in WORKS:
        out.append(("summarization", "work", w, f"Give a three-sentence summary of {w} without giving away the ending."))
    for p in PROVERBS:
        out.append(("summarization", "proverb", p, f"In one sentence, what is the idea behind the saying {_q(p)}?"))
        out.append(("summarization", "proverb-ex", p, f"Explain the proverb {_q(p)} and give an example of when it applies."))
    for e in EVENTS[:20]:
        out.append(("summarization", "event", e, f"Summarize {e} in a short paragraph a busy adult could read in 30 seconds."))
    return [("summarization",) + c for c in out]


GENERATORS = {
    "explanation": gen_explanation, "list": gen_list, "advice": gen_advice, "instruction": gen_instruction,
    "rewrite": gen_rewrite, "math-word-problem": gen_math, "code": gen_code, "follow-up": gen_followup,
    "creative": gen_creative, "roleplay": gen_roleplay, "reasoning": gen_reasoning, "extraction": gen_extraction,
    "summarization": gen_summarization,
}


# ---------------------------------------------------------------------------------------------------
# Filtering, selection, output
# ---------------------------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class Screen:
    """Why a candidate is dropped (None: keep). Holds the eval set and everything accepted so far."""

    def __init__(self, eval_rows: list[dict], handwritten: list[dict]):
        self.eval_grams = set().union(*(ngrams(r["prompt"]) for r in eval_rows))
        self.eval_content = [content(r["prompt"]) for r in eval_rows]
        self.hand_content = [content(r["prompt"]) for r in handwritten]
        self.seen_text = {normalize(r["prompt"]) for r in handwritten}
        self.seen_content = set(self.hand_content)
        self.dropped: Counter = Counter()

    def reason(self, text: str) -> str | None:
        c = content(text)
        if len(text) > MAX_CHARS:
            return "too long"
        if normalize(text) in self.seen_text or c in self.seen_content:
            return "duplicate"
        if ngrams(text) & self.eval_grams:
            return "eval 8-gram"
        if EVAL_SUBJECTS.search(text):
            return "eval subject"
        if any(jaccard(c, e) >= 0.4 for e in self.eval_content):
            return "close to eval"
        if any(jaccard(c, h) >= 0.6 for h in self.hand_content):
            return "close to hand-written"
        return None

    def accept(self, text: str) -> bool:
        why = self.reason(text)
        if why:
            self.dropped[why] += 1
            return False
        self.seen_text.add(normalize(text))
        self.seen_content.add(content(text))
        return True


def select(cands: list[tuple], quota: int, screen: Screen, rng: random.Random, topic_cap: int = 2) -> list[tuple]:
    """Round-robin over templates (each shuffled), at most `topic_cap` prompts per topic, until `quota`."""
    by_tpl: dict[str, list[tuple]] = defaultdict(list)
    for c in cands:
        by_tpl[c[2]].append(c)
    queues = [by_tpl[k] for k in sorted(by_tpl)]
    for q in queues:
        rng.shuffle(q)
    rng.shuffle(queues)
    topics: Counter = Counter()
    chosen: list[tuple] = []
    while len(chosen) < quota and any(queues):
        for q in queues:
            while q:
                c = q.pop()
                if topics[c[3]] < topic_cap and screen.accept(c[4]):
                    topics[c[3]] += 1
                    chosen.append(c)
                    break
            if len(chosen) >= quota:
                break
    if len(chosen) < quota:
        raise SystemExit(f"kind {cands[0][0]}: only {len(chosen)} of {quota} prompts survive the filters")
    return chosen


def build(seed: int = SEED) -> list[dict]:
    hand = read_jsonl(TRAIN)[:KEEP]
    assert [r["id"] for r in hand] == [f"train-{i:04d}" for i in range(1, KEEP + 1)], "hand-written rows changed"
    screen = Screen(read_jsonl(EVAL), hand)
    picked = []
    for kind, gen in GENERATORS.items():  # each kind its own RNG stream: editing one pool leaves the others alone
        rng = random.Random(f"{seed}:{kind}")
        picked += select(gen(rng), QUOTAS[kind], screen, rng, TOPIC_CAPS.get(kind, 2))
    random.Random(f"{seed}:order").shuffle(picked)
    rows = [{"id": r["id"], "category": r["category"], "kind": "handwritten", "prompt": r["prompt"]} for r in hand]
    for i, (kind, cat, _, _, text) in enumerate(picked, KEEP + 1):
        rows.append({"id": f"train-{i:04d}", "category": cat, "kind": kind, "prompt": text})
    build.dropped = screen.dropped  # for the summary line
    return rows


def dumps(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if train.jsonl differs from what would be written")
    ap.add_argument("--seed", type=int, default=SEED)
    a = ap.parse_args(argv)
    rows = build(a.seed)
    text = dumps(rows)
    kinds = Counter(r["kind"] for r in rows)
    cats = Counter(r["category"] for r in rows)
    summary = (f"{len(rows)} prompts; kinds: {dict(sorted(kinds.items()))}; categories: {dict(sorted(cats.items()))}; "
               f"dropped candidates: {dict(build.dropped)}")
    if a.check:
        if TRAIN.read_text(encoding="utf-8") != text:
            print(f"{TRAIN} is stale: run python scripts/make_train_prompts.py", file=sys.stderr)
            return 1
        print(f"{TRAIN} is current ({summary})")
        return 0
    TRAIN.write_text(text, encoding="utf-8")
    print(f"wrote {TRAIN}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
