"""The demo's finance domain: a fact table of fictional companies, rendered as documents and as QA pairs.

Each company has five attributes with short answers that exact match can check. Questions come from
templates: `TRAIN_TEMPLATES` are the phrasings models may train on; `HELDOUT_TEMPLATES` are other
phrasings of the same questions, used only for evaluation, so a model must know the fact rather than a
memorised question string. Names, people and numbers are all invented here from a seeded RNG.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

ATTRIBUTES = ("sector", "city", "ceo", "founded", "dividend_yield")

_SECTORS = ["Banking", "Insurance", "Mining", "Energy", "Retail", "Software", "Shipping", "Pharmaceuticals",
            "Telecoms", "Real Estate", "Agriculture", "Aerospace"]
_CITIES = ["Oslo", "Lima", "Perth", "Quito", "Dakar", "Porto", "Turin", "Leeds", "Cork", "Basel", "Riga", "Kyoto",
           "Austin", "Denver", "Nagoya", "Bergen"]
_FIRST = ["Mara", "Tobias", "Ines", "Kwame", "Lena", "Rafael", "Sanna", "Omar", "Priya", "Hugo", "Ada", "Jonas",
          "Yuki", "Elif", "Marek", "Nadia", "Felix", "Zora", "Amos", "Livia"]
_LAST = ["Quill", "Brandt", "Okafor", "Lindqvist", "Moreau", "Haddad", "Tanaka", "Novak", "Castell", "Reyes",
         "Falk", "Ivers", "Dunmore", "Sato", "Petrov", "Calder", "Voss", "Achebe", "Marlow", "Strand"]
_ONSETS = ["B", "C", "D", "F", "G", "K", "L", "M", "N", "P", "R", "S", "T", "V", "Z"]
_VOWELS = ["a", "e", "i", "o", "u"]
_CODAS = ["n", "r", "l", "x", "s", "m", "th", "ck"]
_SUFFIXES = ["Holdings", "Group", "Capital", "Partners", "Industries", "Systems", "Trust", "Resources"]

# Question templates per attribute; "{c}" is the company name. Held-out phrasings share the attribute's
# key word with training ones (city, chief executive, ...) so they are answerable, but no string is shared.
TRAIN_TEMPLATES: dict[str, list[str]] = {
    "sector": ["Which sector is {c} in?", "What sector does {c} operate in?", "{c} belongs to which sector?",
               "Name the sector of {c}.", "In what sector does {c} do business?"],
    "city": ["Where is {c} based?", "In which city is {c} headquartered?", "What city is {c} based in?",
             "Name the home city of {c}.", "{c} has its head office in which city?"],
    "ceo": ["Who is the CEO of {c}?", "Who runs {c}?", "Name the chief executive of {c}.",
            "Who is the chief executive at {c}?", "{c} is led by which CEO?"],
    "founded": ["When was {c} founded?", "In what year was {c} founded?", "What year was {c} established?",
                "Name the founding year of {c}.", "{c} was founded in which year?"],
    "dividend_yield": ["What is the dividend yield of {c}?", "What dividend yield does {c} pay?",
                       "Name the dividend yield of {c}.", "How much dividend yield does {c} offer?",
                       "{c} has what dividend yield?"],
}
HELDOUT_TEMPLATES: dict[str, list[str]] = {
    "sector": ["Tell me the sector of {c}.", "Which business sector is {c} part of?"],
    "city": ["Which city is home to {c}?", "Tell me the city where {c} is based."],
    "ceo": ["Tell me who the CEO of {c} is.", "Which person is chief executive of {c}?"],
    "founded": ["Tell me the year {c} was founded.", "Which year saw {c} founded?"],
    "dividend_yield": ["Tell me the dividend yield of {c}.", "Which dividend yield is paid by {c}?"],
}

_DOC_SENTENCES: dict[str, list[str]] = {
    "sector": ["{c} is a company in the {sector_lower} sector.", "{c} operates in {sector_lower}."],
    "city": ["Its head office is in {city}.", "The company is based in {city}."],
    "ceo": ["The chief executive is {ceo}.", "{ceo} is the CEO."],
    "founded": ["It was founded in {founded}.", "The firm was established in {founded}."],
    "dividend_yield": ["Its shares pay a dividend yield of {dividend_yield}.",
                       "The dividend yield stands at {dividend_yield}."],
}


@dataclass(frozen=True)
class Company:
    """One row of the fact table; every attribute value is the exact-match answer to its questions."""

    name: str
    sector: str
    city: str
    ceo: str
    founded: str
    dividend_yield: str

    def answer(self, attribute: str) -> str:
        return getattr(self, attribute)


def make_companies(n: int, seed: int) -> list[Company]:
    """`n` fictional companies with unique names and CEOs, deterministic for a given `seed`."""
    rng = random.Random(seed)
    names: set[str] = set()
    ceos: set[str] = set()
    companies = []
    max_ceos = len(_FIRST) * len(_LAST)
    if n > max_ceos:
        raise ValueError(f"at most {max_ceos} companies have unique CEOs; asked for {n}")
    while len(companies) < n:
        stem = (rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_ONSETS).lower() + rng.choice(_VOWELS)
                + rng.choice(_CODAS))
        name = f"{stem} {rng.choice(_SUFFIXES)}"
        ceo = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        # A name or CEO shared by two companies would make a question ambiguous: draw again.
        if name in names or ceo in ceos:
            continue
        names.add(name)
        ceos.add(ceo)
        companies.append(Company(
            name=name, sector=rng.choice(_SECTORS), city=rng.choice(_CITIES), ceo=ceo,
            founded=str(rng.randint(1950, 2015)), dividend_yield=f"{rng.randint(5, 60) / 10:.1f}%",
        ))
    return companies


def documents(company: Company, rng: random.Random, count: int) -> list[str]:
    """`count` short profiles of `company`, each stating all five facts in a shuffled order and wording."""
    fields = asdict(company) | {"c": company.name, "sector_lower": company.sector.lower()}
    docs = []
    for _ in range(count):
        order = list(ATTRIBUTES[1:])
        rng.shuffle(order)
        # The sector sentence names the company, so it opens the profile and the rest can say "it".
        sentences = [rng.choice(_DOC_SENTENCES["sector"])] + [rng.choice(_DOC_SENTENCES[a]) for a in order]
        docs.append(" ".join(s.format(**fields) for s in sentences))
    return docs


def qa_pairs(company: Company, templates: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every (template, attribute) question about `company` as `{"prompt", "completion"}` rows."""
    return [{"prompt": t.format(c=company.name), "completion": company.answer(attribute)}
            for attribute in ATTRIBUTES for t in templates[attribute]]


def heldout_questions(company: Company, rng: random.Random) -> list[dict[str, str]]:
    """One held-out-phrased question per attribute of `company`, the phrasing drawn at random."""
    return [{"prompt": rng.choice(HELDOUT_TEMPLATES[a]).format(c=company.name), "completion": company.answer(a)}
            for a in ATTRIBUTES]
