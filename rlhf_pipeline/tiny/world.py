"""The tiny default's data: a small "movie review" world, generated deterministically from a seed.

    python -m rlhf_pipeline.tiny.world --out recipes/tiny/data      # rewrites the committed files, byte for byte
    python -m rlhf_pipeline.tiny.world --variant graded --out recipes/tiny/compare/data   # the comparison world

Files (gzipped JSON lines):
  corpus.jsonl.gz             {"text"}                     pre-training text: reviews, plot notes, and reviews
                                                           of varied quality (cut off, repetitive, rambling)
  sft.jsonl.gz                {"prompt", "completion"}     demonstrations, mixed sentiment
  preferences-{train,test}    {"prompt", "chosen", "rejected"}  pairs labelled by the simulated annotator
  prompts-{train,test}        {"prompt"}                   review openings for PPO

A review opens with a neutral prefix naming a film ("review of Kalo Mar , a drama by Fin Tor :") and continues with
one to three clauses ("the acting was superb but the plot felt dull ."). The prefix carries no sentiment: a policy
can only please the annotator through what it writes after it.

The `graded` variant (`recipes/tiny/compare/`, for comparing methods) keeps the prompts' format, so the default's
pre-trained and SFT models serve it too, but writes only preferences and prompts: pairs labelled by the graded
annotator (`graded.py`: sentiment strength, two clauses best, repetition penalised), few and noisy, drawn from
candidates of one or two clauses (rarely three) that never repeat a word. A reward model learns there that more and
stronger praise is better, and it has never seen the long or repetitive praise where the graded annotator disagrees:
the over-optimisation a comparison of methods should be able to show.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

from rlhf_pipeline.tiny.annotator import CLAUSE_LINKS, NEGATIVE, POSITIVE, score_text

GENRES = """drama comedy thriller western musical documentary romance horror mystery fantasy adventure biopic satire
noir animation sequel remake epic""".split()
ASPECTS = """acting story script plot score music dialogue cast ending pacing cinematography editing direction humor
soundtrack lead camera premise characters villain hero twist finale opening costumes""".split()
VERBS = ["was", "felt", "seemed", "looked", "sounded", "is", "proved"]
INTENSIFIERS = ["", "", "", "really ", "very ", "quite ", "truly ", "rather "]
PLACES = """a harbour town, a desert, the moon, a small farm, a crowded city, an old ship, a mountain village,
a haunted house, a royal court, a prison, a school, a forest""".split(", ")
ACTIONS = ["searches for", "runs from", "falls for", "fights", "helps", "betrays", "follows", "rescues", "visits"]
SYLLABLES = """ka ri to mo na se lu vi ar en el or an dra bel cor fin gal hol jor kel lam mar nor pel quin ros sam tor
val wen yor zel bri cla fro gre pla ste tru""".split()
PREFIXES = [
    "review of {title} , a {genre} by {name} :",
    "{title} ( {genre} , directed by {name} ) :",
    "my thoughts on the {genre} {title} :",
    "critic notes for {title} , starring {name} :",
    "{name} reviews the new {genre} {title} :",
]


class World:
    """The names of the world (films, people), then samplers for every kind of text in it."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        word = lambda: "".join(self.rng.choice(SYLLABLES) for _ in range(self.rng.randint(2, 3)))  # noqa: E731
        self.titles = sorted({" ".join(word().capitalize() for _ in range(self.rng.randint(1, 2))) for _ in range(300)})
        self.names = sorted({f"{word().capitalize()} {word().capitalize()}" for _ in range(200)})

    def prefix(self) -> str:
        r = self.rng
        return r.choice(PREFIXES).format(title=r.choice(self.titles), genre=r.choice(GENRES), name=r.choice(self.names))

    def clause(self, positive: bool, used: set[str]) -> str:
        r = self.rng
        aspect = r.choice([a for a in ASPECTS if a not in used])
        used.add(aspect)
        word = r.choice([w for w in (POSITIVE if positive else NEGATIVE) if w not in used])
        used.add(word)
        return f"the {aspect} {r.choice(VERBS)} {r.choice(INTENSIFIERS)}{word}"

    def review(self, n_clauses: int | None = None, positive: list[bool] | None = None) -> str:
        """A well-formed continuation: one to three clauses joined by links, ending with ' .'."""
        r = self.rng
        n = n_clauses or r.choice([1, 2, 2, 3])
        signs = positive or [r.random() < 0.5 for _ in range(n)]
        used: set[str] = set()
        text = self.clause(signs[0], used)
        for sign in signs[1:]:
            text += f" {r.choice(CLAUSE_LINKS)} {self.clause(sign, used)}"
        return text + " ."

    def plot_note(self) -> str:
        r = self.rng
        return (f"in {r.choice(self.titles)} , {r.choice(self.names)} {r.choice(ACTIONS)} {r.choice(self.names)} "
                f"in {r.choice(PLACES)} .")

    def candidate(self) -> str:
        """A response of varied quality, as different policies would write: the material of preference pairs."""
        r = self.rng
        kind = r.random()
        if kind < 0.55:
            return self.review()
        if kind < 0.70:  # cut off before the end
            words = self.review(n_clauses=r.choice([2, 3])).split()
            return " ".join(words[: r.randint(2, len(words) - 2)])
        if kind < 0.85:  # repetitive
            clause = self.clause(r.random() < 0.5, set())
            word = clause.split()[-1]
            return r.choice([f"{clause} {word} {word} .", f"{clause} and {clause} ."])
        # rambling: more clauses than a review needs
        return self.review(n_clauses=r.choice([4, 5]))


def labelled_pairs(world: World, n: int, candidate, score, noise: float) -> list[dict]:
    """`n` preference pairs: a prompt and two `candidate()` responses, labelled by the annotator's `score`; pairs
    scored within 0.1 of each other are skipped (annotators are asked to compare clearly different answers) and a
    `noise` share of the labels is flipped, drawing from the world's random stream."""
    rows = []
    while len(rows) < n:
        prompt, a, b = world.prefix(), candidate(), candidate()
        score_a, score_b = score(a), score(b)
        if abs(score_a - score_b) < 0.1:
            continue
        if (score_a < score_b) != (world.rng.random() < noise):
            a, b = b, a
        rows.append({"prompt": prompt, "chosen": " " + a, "rejected": " " + b})
    return rows


def generate(seed: int = 0, n_corpus: int = 20000, n_sft: int = 4000, n_pairs: int = 6000, n_pairs_test: int = 500,
             n_prompts: int = 2000, n_prompts_test: int = 256, label_noise: float = 0.05,
             n_corpus_varied: int = 5000) -> dict[str, list[dict]]:
    """All tiny-default data sets, deterministically from `seed`."""
    world = World(seed)
    r = world.rng
    corpus = [{"text": f"{world.prefix()} {world.review()}" if r.random() < 0.8 else world.plot_note()}
              for _ in range(n_corpus)]
    # web text is not all well written: reviews of varied quality (cut off, repetitive, rambling), drawn from a stream
    # of their own so that every other data set stays as it was
    varied = World(seed)
    varied.rng = random.Random(f"{seed}-varied")
    corpus += [{"text": f"{varied.prefix()} {varied.candidate()}"} for _ in range(n_corpus_varied)]
    varied.rng.shuffle(corpus)
    sft = [{"prompt": world.prefix(), "completion": " " + world.review()} for _ in range(n_sft)]

    def pairs(n: int) -> list[dict]:
        return labelled_pairs(world, n, world.candidate, score_text, label_noise)

    return {
        "corpus": corpus,
        "sft": sft,
        "preferences-train": pairs(n_pairs),
        "preferences-test": pairs(n_pairs_test),
        "prompts-train": [{"prompt": world.prefix()} for _ in range(n_prompts)],
        "prompts-test": [{"prompt": world.prefix()} for _ in range(n_prompts_test)],
    }


def graded_candidate(world: World, p_positive: float = 0.6, p_three: float = 0.05) -> str:
    """A candidate response of the graded world: one or two well-formed clauses (three with probability `p_three`),
    or one cut off; never a repeated word, never more than three clauses."""
    r = world.rng
    if r.random() < 0.2:  # cut off before the end
        words = world.review(n_clauses=2).split()
        return " ".join(words[: r.randint(2, len(words) - 2)])
    n = 3 if r.random() < p_three else r.choice([1, 2, 2])
    return world.review(n_clauses=n, positive=[r.random() < p_positive for _ in range(n)])


def generate_graded(seed: int = 0, n_pairs: int = 1000, n_pairs_test: int = 500, n_prompts: int = 2000,
                    n_prompts_test: int = 256, label_noise: float = 0.25, test_label_noise: float = 0.0,
                    p_three: float = 0.05) -> dict[str, list[dict]]:
    """The graded comparison world's data sets, deterministically from `seed`: preference pairs labelled by the graded
    annotator (`label_noise` of the training labels flipped; the test pairs' labels are gold unless
    `test_label_noise`), and prompts in the default world's format."""
    from rlhf_pipeline.tiny.graded import graded_score_text

    world = World(seed)  # the default world's films and people
    world.rng = random.Random(f"{seed}-graded")

    def pairs(n: int, noise: float) -> list[dict]:
        return labelled_pairs(world, n, lambda: graded_candidate(world, p_three=p_three), graded_score_text, noise)

    return {
        "preferences-train": pairs(n_pairs, label_noise),
        "preferences-test": pairs(n_pairs_test, test_label_noise),
        "prompts-train": [{"prompt": world.prefix()} for _ in range(n_prompts)],
        "prompts-test": [{"prompt": world.prefix()} for _ in range(n_prompts_test)],
    }


VARIANTS = {"default": generate, "graded": generate_graded}


def write(out_dir: Path, seed: int = 0, variant: str = "default") -> list[Path]:
    """Write every data set of `variant` as `<name>.jsonl.gz`, byte-identical for a given seed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in VARIANTS[variant](seed).items():
        path = out_dir / f"{name}.jsonl.gz"
        payload = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode()
        with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            gz.write(payload)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("recipes/tiny/data"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="default",
                        help="default: the tiny default's data; graded: the comparison world's (recipes/tiny/compare)")
    args = parser.parse_args()
    for path in write(args.out, args.seed, args.variant):
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
