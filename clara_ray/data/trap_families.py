"""What the trap-corpus generator draws from: relations, name pools, filler sentences, families.

A *family* (`TrapFamily`) fixes the kind of corpus: which relations, which name
pool, how many echo and near-miss documents each fact gets, how many question
wordings, and how much filler pads a document. A seed (``data.trap.seed``) then
draws the people, their facts and every template choice. Families are data, so
a new one is a few lines here.

Held-out families (`HELD_OUT_FAMILIES`) exist to judge a recipe on data it was
not tuned on: their relations, templates and name pool appear in no other
family. Declared in BENCHMARKS.md ("Trap families") before any tuning; tuning
runs use the other families only.

Template rules, checked by tests/unit/test_trap.py for every family:
- a question template contains ``{name}`` once;
- a gold template states ``{value}`` (or ``{a_value}``, "an oboe") and shares no
  word with any of its relation's question templates except the name;
- an echo template repeats question words and ``{name}`` and holds no value;
- a near-miss template names the person and a *wrong* ``{value}`` in the
  question's words (a document a reader takes the wrong answer from);
- a filler sentence shares no word with any question template and holds no value.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Relation:
    """One kind of fact. Templates use ``{name}``, ``{value}`` and ``{a_value}`` ("an oboe")."""

    name: str
    values: tuple[str, ...]
    question_templates: tuple[str, ...]
    gold_templates: tuple[str, ...]
    echo_templates: tuple[str, ...]
    near_miss_templates: tuple[str, ...] = ()


_RELATIONS: tuple[Relation, ...] = (
    # ----------------------------------------------- the bundled corpus's three
    Relation(
        name="birth_city",
        values=(
            "Marlow", "Tessin", "Brakka", "Quorin", "Velmora", "Ostrel", "Dunmere", "Halvik",
            "Corrin", "Pellan", "Yarrow", "Sendal", "Mirevale", "Tolliver", "Ashkirk", "Brennos",
            "Calden", "Farrow", "Grisby", "Lunvik", "Norrath", "Ravelle", "Stowick", "Umbrel",
        ),
        question_templates=(
            "Which city was {name} born in?",
            "In which city was {name} born?",
            "What is the birth city of {name}?",
            "Where was {name} born?",
        ),
        gold_templates=(
            "{name} grew up near {value} and still calls it home.",
            "{name} spent childhood years around {value}.",
            "{name} came into this world at {value}.",
        ),
        echo_templates=(
            "Which city was {name} born in? Records of the birth city of {name} were lost.",
            "In which city was {name} born? Nobody knows the birth city of {name}.",
            "What is the birth city of {name}? The city where {name} was born is unknown.",
            "The birth city of {name} is a question; which city {name} was born in is unknown.",
        ),
        near_miss_templates=(
            "Was {name} born in {value}? No, the birth city of {name} is not {value}.",
            "Some say the city where {name} was born is {value}, but that is wrong.",
        ),
    ),
    Relation(
        name="profession",
        values=(
            "baker", "surveyor", "carpenter", "weaver", "potter", "tailor", "glassblower",
            "cartographer", "librarian", "chemist", "pilot", "sailor", "farmer", "jeweler",
            "locksmith", "architect", "nurse", "dentist", "florist", "butcher", "translator",
            "geologist", "astronomer", "beekeeper",
        ),
        question_templates=(
            "What is the profession of {name}?",
            "What job does {name} do for work?",
            "Which profession does {name} work in?",
            "What kind of work does {name} do?",
        ),
        gold_templates=(
            "{name} earns a living as {a_value}.",
            "{name} has been {a_value} since leaving school.",
            "{name} trained many years to become {a_value}.",
        ),
        echo_templates=(
            "What is the profession of {name}? Nobody knows what job {name} does for work.",
            "Which profession does {name} work in? The profession of {name} was never recorded.",
            "What job does {name} do for work? The job and profession of {name} are unknown.",
            "The profession of {name} is a question; which job {name} does for work is unclear.",
        ),
        near_miss_templates=(
            "Does {name} work as {a_value}? No, the profession of {name} is not {value}.",
            "Some think the job of {name} is {value} work, but that is wrong.",
        ),
    ),
    Relation(
        name="instrument",
        values=(
            "cello", "violin", "flute", "harp", "oboe", "trumpet", "banjo", "piano", "clarinet",
            "drum", "saxophone", "tuba", "lute", "mandolin", "accordion", "bassoon", "trombone",
            "ukulele", "harmonica", "viola", "sitar", "zither", "bagpipe", "xylophone",
        ),
        question_templates=(
            "Which instrument does {name} play?",
            "What musical instrument does {name} play?",
            "What instrument is {name} known to play?",
            "Which instrument can {name} play well?",
        ),
        gold_templates=(
            "{name} practices the {value} every evening.",
            "On stage, {name} performs with {a_value}.",
            "{name} owns an old {value} and carries it everywhere.",
        ),
        echo_templates=(
            "Which instrument does {name} play? Nobody has heard {name} play any instrument.",
            "What musical instrument does {name} play? The instrument of {name} is unknown.",
            "What instrument is {name} known to play? No musical instrument of {name} was seen.",
            "The musical instrument {name} is known to play is a question nobody can answer.",
        ),
        near_miss_templates=(
            "Does {name} play the {value}? No, the instrument of {name} is not the {value}.",
            "Some say the musical instrument {name} plays is {a_value}, but that is wrong.",
        ),
    ),
    # --------------------------------------------- more relations for tuning
    Relation(
        name="pet",
        values=(
            "parrot", "tortoise", "ferret", "hamster", "goldfish", "rabbit", "iguana", "canary",
            "gecko", "hedgehog", "chinchilla", "beagle", "poodle", "terrier", "spaniel", "collie",
            "dalmatian", "greyhound", "husky", "lizard", "toad", "budgie", "alpaca", "pony",
        ),
        question_templates=(
            "What kind of pet does {name} keep?",
            "Which animal does {name} keep as their pet?",
            "What pet does {name} have at home?",
            "Which pet animal shares the house of {name}?",
        ),
        gold_templates=(
            "{name} feeds {a_value} twice each day.",
            "Every morning {name} strolls beside {a_value}.",
            "{name} adopted {a_value} from a shelter last winter.",
        ),
        echo_templates=(
            "What kind of pet does {name} keep? Nobody has seen the pet of {name}.",
            "Which animal does {name} keep as their pet? The pet animal of {name} is unknown.",
            "What pet does {name} have at home? The house of {name} has no known pet.",
            "The pet animal {name} keeps at home is a question nobody can answer.",
        ),
        near_miss_templates=(
            "Does {name} keep {a_value} as their pet? No, the pet of {name} is not {a_value}.",
            "Some say the pet animal at the home of {name} is {a_value}, but that is wrong.",
        ),
    ),
    Relation(
        name="sport",
        values=(
            "tennis", "rugby", "cricket", "hockey", "fencing", "rowing", "archery", "badminton",
            "volleyball", "handball", "judo", "karate", "curling", "lacrosse", "polo", "squash",
            "snooker", "bowling", "cycling", "skiing", "surfing", "climbing", "wrestling", "netball",
        ),
        question_templates=(
            "Which sport does {name} play?",
            "What sport is {name} good at?",
            "What is the favourite sport of {name}?",
            "Which sport does {name} enjoy most?",
        ),
        gold_templates=(
            "{name} won a regional trophy in {value}.",
            "On weekends {name} trains hard for {value} matches.",
            "{name} coaches children in {value} after lunch.",
        ),
        echo_templates=(
            "Which sport does {name} play? Nobody has seen {name} play any sport.",
            "What sport is {name} good at? The favourite sport of {name} is unknown.",
            "What is the favourite sport of {name}? Which sport {name} enjoys is unclear.",
            "Which sport does {name} enjoy most? Nobody knows what sport {name} is good at.",
        ),
        near_miss_templates=(
            "Is {name} good at {value}? No, the favourite sport of {name} is not {value}.",
            "Some say the sport {name} plays most is {value}, but that is wrong.",
        ),
    ),
    # ---------------------------------------- held out: used by no tuning family
    Relation(
        name="language",
        values=(
            "Danish", "Hungarian", "Swahili", "Tagalog", "Icelandic", "Welsh", "Basque", "Finnish",
            "Polish", "Greek", "Turkish", "Hindi", "Korean", "Malay", "Dutch", "Czech", "Latvian",
            "Maltese", "Catalan", "Gaelic", "Estonian", "Yoruba", "Amharic", "Nepali",
        ),
        question_templates=(
            "Which language does {name} speak?",
            "What language is spoken by {name}?",
            "In what language does {name} talk?",
            "What is the native tongue of {name}?",
            "Which tongue does {name} use at home?",
        ),
        gold_templates=(
            "{name} chats fluently using {value} with old friends.",
            "Letters {name} sends are always penned with {value} words.",
            "{name} learned {value} as a child and never forgot it.",
        ),
        echo_templates=(
            "Which language does {name} speak? Nobody has heard {name} speak any language.",
            "What language is spoken by {name}? The native tongue of {name} is unknown.",
            "In what language does {name} talk? Which tongue {name} uses at home is unclear.",
            "What is the native tongue of {name}? No spoken language of {name} was recorded.",
        ),
        near_miss_templates=(
            "Does {name} speak {value}? No, the native tongue of {name} is not {value}.",
            "Some say the language spoken by {name} at home is {value}, but that is wrong.",
        ),
    ),
    Relation(
        name="vehicle",
        values=(
            "tractor", "scooter", "motorbike", "minibus", "canoe", "kayak", "sledge", "rickshaw",
            "hovercraft", "glider", "yacht", "jeep", "limousine", "moped", "bicycle", "tricycle",
            "tandem", "unicycle", "caravan", "lorry", "gondola", "catamaran", "snowmobile", "taxi",
        ),
        question_templates=(
            "What vehicle does {name} drive?",
            "Which vehicle does {name} travel in?",
            "How does {name} get around town?",
            "What does {name} ride to get around?",
            "Which vehicle belongs to {name}?",
        ),
        gold_templates=(
            "{name} parks {a_value} outside every night.",
            "Most days {name} is seen steering {a_value} down the lane.",
            "{name} bought {a_value} with savings from summer jobs.",
        ),
        echo_templates=(
            "What vehicle does {name} drive? Nobody has seen {name} drive any vehicle.",
            "Which vehicle does {name} travel in? How {name} gets around town is unknown.",
            "How does {name} get around town? The vehicle of {name} was never seen.",
            "What does {name} ride to get around? Which vehicle belongs to {name} is unclear.",
        ),
        near_miss_templates=(
            "Does {name} drive {a_value}? No, the vehicle of {name} is not {a_value}.",
            "Some say {name} gets around town in {a_value}, but that is wrong.",
        ),
    ),
    Relation(
        name="dish",
        values=(
            "risotto", "goulash", "paella", "lasagne", "ramen", "couscous", "moussaka", "falafel",
            "dumplings", "pancakes", "porridge", "omelette", "curry", "chowder", "gnocchi",
            "burritos", "tacos", "sushi", "kebab", "pierogi", "ratatouille", "gumbo", "borscht",
            "polenta",
        ),
        question_templates=(
            "What is the favourite dish of {name}?",
            "Which dish does {name} like best?",
            "What food does {name} love to eat?",
            "Which meal does {name} order most often?",
            "What does {name} like to eat most?",
        ),
        gold_templates=(
            "{name} cooks {value} nearly every weekend.",
            "Friends say {name} never refuses a plate with {value}.",
            "{name} once travelled far just for good {value}.",
        ),
        echo_templates=(
            "What is the favourite dish of {name}? Nobody knows what food {name} likes best.",
            "Which dish does {name} like best? The favourite food of {name} is unknown.",
            "What food does {name} love to eat? Which meal {name} orders most often is unclear.",
            "Which meal does {name} order most often? What {name} likes to eat is a question.",
        ),
        near_miss_templates=(
            "Does {name} like {value} best? No, the favourite dish of {name} is not {value}.",
            "Some say the food {name} loves to eat most is {value}, but that is wrong.",
        ),
    ),
)
RELATIONS: dict[str, Relation] = {relation.name: relation for relation in _RELATIONS}

# Every syllable of a pool has the same length, so every name part of a pool
# has the same length: a full name can then only be a substring of another
# full name if the two are equal.
NAME_POOLS: dict[str, tuple[str, ...]] = {
    "bundled": (
        "zor", "van", "kel", "lit", "mar", "ben", "dra", "fen", "gal", "hir", "jor", "kas",
        "lum", "nor", "pel", "qui", "rad", "sil", "tam", "vor", "wen", "yel", "bri", "dun",
    ),
    "tuning": (
        "ash", "bel", "cor", "dax", "eli", "fir", "gon", "hal", "isk", "jen", "kor", "lir",
        "mos", "nev", "oth", "par", "rus", "sel", "tor", "ulf", "ves", "wyn", "xan", "yor",
    ),
    "held_out": (
        "thal", "brin", "mesk", "orla", "vend", "quil", "dros", "fany", "gild", "hurn", "jask",
        "lorn", "mirt", "nesh", "pold", "rask", "skal", "tovi", "ulma", "vask", "wyth", "yarl",
        "zeph", "krin",
    ),
}

# Sentences that pad documents (all kinds alike, so length says nothing about gold).
FILLERS: tuple[str, ...] = (
    "Rain fell steadily across northern valleys that spring.",
    "Old friends remember long walks beside quiet rivers.",
    "Local newspapers once printed several photographs.",
    "Winters there were cold and summers brought heavy storms.",
    "Neighbours describe someone friendly, patient and curious.",
    "Many letters survive from those years.",
    "Family gatherings usually happen during autumn.",
    "Several cousins moved abroad long ago.",
    "Sunday mornings begin with strong coffee and fresh bread.",
    "Schoolmates recall sharp humour and loud laughter.",
    "Tall pine trees surround an old family cottage.",
    "Some evenings end with long conversations over candlelight.",
)


@dataclass(frozen=True)
class TrapFamily:
    """A kind of trap corpus; ``generate_trap_corpus(family=...)`` draws one with a seed."""

    name: str
    relations: tuple[str, ...]
    name_pool: str
    echoes_per_fact: tuple[int, int] = (2, 2)  # drawn per fact, inclusive
    near_misses_per_fact: int = 0
    question_templates: int = 3  # wordings per relation (the first n); training asks each
    gold_templates: int = 3
    echo_templates: int = 4
    fillers_per_document: tuple[int, int] = (0, 0)  # drawn per document, inclusive

    def relation_list(self) -> list[Relation]:
        """The relations with only the templates this family uses."""
        chosen = []
        for name in self.relations:
            relation = RELATIONS[name]
            chosen.append(
                Relation(
                    name=relation.name,
                    values=relation.values,
                    question_templates=relation.question_templates[: self.question_templates],
                    gold_templates=relation.gold_templates[: self.gold_templates],
                    echo_templates=relation.echo_templates[: self.echo_templates],
                    near_miss_templates=relation.near_miss_templates,
                )
            )
        return chosen


FAMILIES: dict[str, TrapFamily] = {
    family.name: family
    for family in (
        # The corpus of every figure before families existed (same seed, same corpus).
        TrapFamily("bundled", ("birth_city", "profession", "instrument"), "bundled"),
        # Tuning families.
        TrapFamily(
            "wide", ("birth_city", "profession", "instrument", "pet", "sport"), "tuning",
            echoes_per_fact=(1, 3), question_templates=4, fillers_per_document=(0, 2),
        ),
        TrapFamily(
            "near_miss", ("profession", "pet"), "tuning",
            echoes_per_fact=(1, 2), near_misses_per_fact=1, question_templates=4,
            fillers_per_document=(0, 1),
        ),
        # wide's two differences from bundled taken one at a time (BENCHMARKS.md, "Two scratch
        # tuning families"): its document shape with bundled's three relations, and
        # bundled's shape with its five relations.
        TrapFamily(
            "wide3", ("birth_city", "profession", "instrument"), "tuning",
            echoes_per_fact=(1, 3), question_templates=4, fillers_per_document=(0, 2),
        ),
        TrapFamily("bundled5", ("birth_city", "profession", "instrument", "pet", "sport"), "bundled"),
        # Held out (BENCHMARKS.md, "Trap families"): evaluated, never tuned on.
        TrapFamily(
            "held_out_a", ("language", "vehicle", "dish"), "held_out",
            echoes_per_fact=(2, 4), question_templates=4, fillers_per_document=(1, 2),
        ),
        TrapFamily(
            "held_out_b", ("language", "dish"), "held_out",
            echoes_per_fact=(1, 1), near_misses_per_fact=1, question_templates=5,
            fillers_per_document=(0, 2),
        ),
    )
}
HELD_OUT_FAMILIES = ("held_out_a", "held_out_b")
