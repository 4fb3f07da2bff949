"""The built-in, procedurally generated instruction suite (raymix's embedded default).

raymix needs a task pool that exists without downloads, is fully reproducible
and makes the choice of mixture matter.  This module generates one:

* 23 training task types (string, list, arithmetic, logic and lookup skills),
  each with several instruction phrasings so the model must read the
  instruction rather than guess the task from the input's shape;
* task sizes spanning 40x, with the *small* tasks deliberately the *hard*
  ones (longer inputs, multi-step, memorised lookups), so size-proportional
  mixing starves them and differs sharply from uniform mixing;
* 7 held-out out-of-domain (OOD) task types that compose training skills and
  never appear in the training pool; four of them carry multiple-choice options
  for loglikelihood evaluation.

Everything is generated from ``random.Random`` seeded by a stable function of
(seed, task name), so a pool is identical across runs and machines.

Over 500 lines on purpose: 30 small task generators, each a few lines, kept
beside the table that sets their sizes and difficulties so the suite can be
read (and its balance checked) in one place.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from raymix.errors import RaymixError
from raymix.tasks.records import TaskRecord

Example = tuple[str, str, tuple[str, ...]]
Generator = Callable[[random.Random], Example]

# How many times to redraw an example whose prompt was already produced; small
# input spaces (lookups, times tables) are allowed to repeat after that.
_MAX_RETRIES = 10

# Words are built from consonant-vowel syllables, so no word list is needed and
# the model cannot lean on pretraining knowledge of real words.
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
# A few real words keep the inputs from being entirely alien.
_COMMON_WORDS = (
    "apple", "river", "stone", "cloud", "house", "green", "table", "light",
    "water", "dog", "cat", "bird", "tree", "music", "paper", "window", "garden",
    "sun", "moon", "bread", "chair", "road", "cold", "warm", "night", "story",
    "horse", "lemon", "smile", "train", "glass", "summer", "winter", "button",
)


def _pseudo_word(rng: random.Random, min_syl: int = 2, max_syl: int = 3) -> str:
    # An occasional leading vowel makes first-letter answers cover vowels too.
    head = rng.choice(_VOWELS) if rng.random() < 0.2 else ""
    return head + "".join(
        rng.choice(_CONSONANTS) + rng.choice(_VOWELS)
        for _ in range(rng.randint(min_syl, max_syl))
    )


def _word(rng: random.Random, min_syl: int = 2, max_syl: int = 3, common: float = 0.25) -> str:
    if rng.random() < common:
        return rng.choice(_COMMON_WORDS)
    return _pseudo_word(rng, min_syl, max_syl)


def _build_tables() -> tuple[dict[str, str], dict[str, str]]:
    """The invented country->capital and word->antonym tables.

    Built from a fixed seed, independent of the suite seed, so the training
    lookup tasks and the OOD tasks that compose them always agree.
    """
    rng = random.Random(0x5EED7AB1E)
    used: set[str] = set(_COMMON_WORDS)

    def fresh(min_syl: int, max_syl: int, suffix: str = "") -> str:
        while True:
            w = _pseudo_word(rng, min_syl, max_syl) + suffix
            if w not in used:
                used.add(w)
                return w

    capitals: dict[str, str] = {}
    for _ in range(40):
        # Suffixes start with a consonant because pseudo-words end in a vowel.
        country = fresh(2, 2, rng.choice(("nia", "land", "stan", "ria", "dor"))).capitalize()
        capitals[country] = fresh(2, 3).capitalize()
    antonyms: dict[str, str] = {}
    for _ in range(30):
        a, b = fresh(2, 2), fresh(2, 2)
        antonyms[a], antonyms[b] = b, a
    return capitals, antonyms


COUNTRY_CAPITALS, ANTONYMS = _build_tables()
_COUNTRIES = tuple(COUNTRY_CAPITALS)
_ANTONYM_WORDS = tuple(ANTONYMS)


def _pick(rng: random.Random, templates: Sequence[str], **kw: object) -> str:
    return rng.choice(templates).format(**kw)


def _nums(rng: random.Random, n: int, lo: int = 0, hi: int = 99) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(n)]


def _fmt(xs: Sequence[int]) -> str:
    return ", ".join(map(str, xs))


def _tf(v: bool) -> str:
    return "true" if v else "false"


# --------------------------------------------------------------- string skills
def _uppercase(rng: random.Random) -> Example:
    w = _word(rng)
    return _pick(rng, ('Write the word "{w}" in capital letters.',
                       'Convert "{w}" to uppercase.',
                       'Rewrite "{w}" using only upper-case letters.'), w=w), w.upper(), ()


def _first_letter(rng: random.Random) -> Example:
    w = _word(rng)
    return _pick(rng, ('What is the first letter of the word "{w}"?',
                       'Give the first letter of "{w}".',
                       'Which letter does the word "{w}" start with?'), w=w), w[0], ()


def _last_letter(rng: random.Random) -> Example:
    w = _word(rng)
    return _pick(rng, ('What is the last letter of the word "{w}"?',
                       'Give the final letter of "{w}".',
                       'Which letter does the word "{w}" end with?'), w=w), w[-1], ()


def _copy_text(rng: random.Random) -> Example:
    t = " ".join(_word(rng, 1, 2) for _ in range(rng.randint(2, 4)))
    return _pick(rng, ('Copy this text exactly: "{t}"',
                       'Repeat the following text without changes: "{t}"',
                       'Write out "{t}" exactly as given.'), t=t), t, ()


def _reverse_word(rng: random.Random) -> Example:
    w = _word(rng)
    return _pick(rng, ('Reverse the letters of the word "{w}".',
                       'Write the word "{w}" backwards.',
                       'Spell "{w}" in reverse order, last letter first.'), w=w), w[::-1], ()


def _count_letters(rng: random.Random) -> Example:
    w = _word(rng, 2, 4)
    return _pick(rng, ('How many letters are in the word "{w}"?',
                       'Count the letters of "{w}".',
                       'What is the length of the word "{w}" in letters?'), w=w), str(len(w)), ()


def _repeat_word(rng: random.Random) -> Example:
    w, n = _word(rng, 1, 2), rng.randint(2, 4)
    return _pick(rng, ('Write the word "{w}" {n} times, separated by spaces.',
                       'Repeat "{w}" exactly {n} times.',
                       'Say "{w}" {n} times in a row.'), w=w, n=n), " ".join([w] * n), ()


def _count_char(rng: random.Random) -> Example:
    w = _pseudo_word(rng, 3, 4)
    # Mostly ask about a letter that occurs, sometimes one that does not (-> 0).
    absent = [c for c in _CONSONANTS + _VOWELS if c not in w]
    c = rng.choice(w) if rng.random() < 0.8 or not absent else rng.choice(absent)
    return _pick(rng, ('How many times does the letter "{c}" appear in the word "{w}"?',
                       'Count how often "{c}" occurs in "{w}".',
                       'In the word "{w}", how many letters are "{c}"?'),
                 c=c, w=w), str(w.count(c)), ()


# ----------------------------------------------------------------- list skills
def _list_length(rng: random.Random) -> Example:
    xs = _nums(rng, rng.randint(2, 8))
    return _pick(rng, ('How many numbers are in this list: {l}?',
                       'Count the numbers in the list {l}.',
                       'What is the length of the list {l}?'), l=_fmt(xs)), str(len(xs)), ()


def _list_max(rng: random.Random) -> Example:
    xs = _nums(rng, rng.randint(3, 6))
    return _pick(rng, ('What is the largest number in this list: {l}?',
                       'Find the maximum of {l}.',
                       'Which is the biggest number among {l}?'), l=_fmt(xs)), str(max(xs)), ()


def _list_min(rng: random.Random) -> Example:
    xs = _nums(rng, rng.randint(3, 6))
    return _pick(rng, ('What is the smallest number in this list: {l}?',
                       'Find the minimum of {l}.',
                       'Which is the lowest number among {l}?'), l=_fmt(xs)), str(min(xs)), ()


def _sort_numbers(rng: random.Random) -> Example:
    xs = _nums(rng, rng.randint(4, 5))
    return _pick(rng, ('Sort these numbers from smallest to largest: {l}.',
                       'Put the list {l} in ascending order.',
                       'Arrange {l} in increasing order, separated by commas.'),
                 l=_fmt(xs)), _fmt(sorted(xs)), ()


# ------------------------------------------------------------------ arithmetic
def _successor(rng: random.Random) -> Example:
    a = rng.randint(0, 9999)
    return _pick(rng, ('What number comes right after {a}?',
                       'What is {a} plus one?',
                       'Give the successor of the number {a}.'), a=a), str(a + 1), ()


def _parity(rng: random.Random) -> Example:
    a = rng.randint(0, 99999)
    return _pick(rng, ('Is the number {a} even or odd?',
                       'Tell whether {a} is even or odd.',
                       'Answer even or odd: what is the parity of {a}?'),
                 a=a), "even" if a % 2 == 0 else "odd", ()


def _compare_numbers(rng: random.Random) -> Example:
    a, b = rng.sample(range(1000), 2)
    return _pick(rng, ('Which number is larger: {a} or {b}?',
                       'Of {a} and {b}, which is bigger?',
                       'Give the greater of the two numbers {a} and {b}.'),
                 a=a, b=b), str(max(a, b)), ()


def _add(rng: random.Random) -> Example:
    a, b = _nums(rng, 2)
    return _pick(rng, ('What is {a} plus {b}?',
                       'Add {a} and {b}.',
                       'Compute the sum of {a} and {b}.'), a=a, b=b), str(a + b), ()


def _subtract(rng: random.Random) -> Example:
    b, a = sorted(_nums(rng, 2))  # keep results non-negative
    return _pick(rng, ('What is {a} minus {b}?',
                       'Subtract {b} from {a}.',
                       'Compute the difference {a} take away {b}.'), a=a, b=b), str(a - b), ()


def _multiply_small(rng: random.Random) -> Example:
    a, b = rng.randint(2, 9), rng.randint(10, 30)
    if rng.random() < 0.5:
        a, b = b, a
    return _pick(rng, ('What is {a} times {b}?',
                       'Multiply {a} by {b}.',
                       'Compute the product of {a} and {b}.'), a=a, b=b), str(a * b), ()


def _add_three(rng: random.Random) -> Example:
    a, b, c = _nums(rng, 3, 10, 99)
    return _pick(rng, ('What is {a} plus {b} plus {c}?',
                       'Add the three numbers {a}, {b} and {c} together.',
                       'Compute {a} + {b} + {c}.'), a=a, b=b, c=c), str(a + b + c), ()


# ----------------------------------------------------------------------- logic
def _bool_expr(rng: random.Random) -> Example:
    def literal() -> tuple[str, bool]:
        v = rng.random() < 0.5
        return (f"not {_tf(v)}", not v) if rng.random() < 0.35 else (_tf(v), v)

    def combine(x: bool, op: str, y: bool) -> bool:
        return (x and y) if op == "and" else (x or y)

    (s1, v1), (s2, v2), op = literal(), literal(), rng.choice(("and", "or"))
    expr, val = f"{s1} {op} {s2}", combine(v1, op, v2)
    if rng.random() < 0.5:  # a third operand makes it a two-step evaluation
        (s3, v3), op2 = literal(), rng.choice(("and", "or"))
        expr, val = f"({expr}) {op2} {s3}", combine(val, op2, v3)
    return _pick(rng, ('Is the expression "{e}" true or false?',
                       'Evaluate the boolean expression "{e}".',
                       'Answer true or false: what is the value of "{e}"?'), e=expr), _tf(val), ()


def _yes_no_compare(rng: random.Random) -> Example:
    a, b = rng.sample(range(1000), 2)
    greater = rng.random() < 0.5
    rel = rng.choice(("greater than", "larger than") if greater else ("less than", "smaller than"))
    ans = "yes" if (a > b) == greater else "no"
    return _pick(rng, ('Is {a} {rel} {b}? Answer yes or no.',
                       'Answer yes or no: is {a} {rel} {b}?',
                       'Reply with yes or no. Is the number {a} {rel} {b}?'),
                 a=a, b=b, rel=rel), ans, ()


# ---------------------------------------------------------------------- lookup
def _capital_lookup(rng: random.Random) -> Example:
    c = rng.choice(_COUNTRIES)
    return _pick(rng, ('What is the capital of the invented country {c}?',
                       'Name the capital city of {c}.',
                       'The country {c} has which city as its capital?'),
                 c=c), COUNTRY_CAPITALS[c], ()


def _antonym_lookup(rng: random.Random) -> Example:
    w = rng.choice(_ANTONYM_WORDS)
    return _pick(rng, ('In the invented language, what is the opposite of "{w}"?',
                       'Give the antonym of the made-up word "{w}".',
                       'Which word means the opposite of "{w}"?'), w=w), ANTONYMS[w], ()


# ------------------------------------------------------- out-of-domain (held out)
def _ood_reverse_uppercase(rng: random.Random) -> Example:
    w = _word(rng)
    return _pick(rng, ('Reverse the word "{w}" and write the result in capital letters.',
                       'Write "{w}" backwards, all in uppercase.'), w=w), w[::-1].upper(), ()


def _ood_list_sum(rng: random.Random) -> Example:
    xs = _nums(rng, rng.randint(3, 4), 1, 30)
    return _pick(rng, ('What is the sum of the numbers in this list: {l}?',
                       'Add up all the numbers in the list {l}.'), l=_fmt(xs)), str(sum(xs)), ()


def _ood_max_parity(rng: random.Random) -> Example:
    xs = _nums(rng, rng.randint(3, 5))
    ans = "even" if max(xs) % 2 == 0 else "odd"
    return _pick(rng, ('Is the largest number in the list {l} even or odd?',
                       'Take the maximum of {l}. Is it even or odd?'),
                 l=_fmt(xs)), ans, ("even", "odd")


def _ood_capital_first_letter(rng: random.Random) -> Example:
    c = rng.choice(_COUNTRIES)
    ans = COUNTRY_CAPITALS[c][0]
    pool = sorted({cap[0] for cap in COUNTRY_CAPITALS.values()} - {ans})
    choices = rng.sample(pool, 3) + [ans]
    rng.shuffle(choices)
    return _pick(rng, ('What is the first letter of the capital of the invented country {c}?',
                       'With which letter does the name of the capital city of {c} begin?'),
                 c=c), ans, tuple(choices)


def _ood_longer_word(rng: random.Random) -> Example:
    a = _word(rng, 1, 4)
    b = _word(rng, 1, 4)
    while len(b) == len(a):
        b = _word(rng, 1, 4)
    return _pick(rng, ('Which word is longer, "{a}" or "{b}"?',
                       'Of the words "{a}" and "{b}", which has more letters?'),
                 a=a, b=b), a if len(a) > len(b) else b, (a, b)


def _ood_antonym_uppercase(rng: random.Random) -> Example:
    w = rng.choice(_ANTONYM_WORDS)
    return _pick(rng, ('Write the opposite of the made-up word "{w}" in capital letters.',
                       'Give the antonym of "{w}" in the invented language, in uppercase.'),
                 w=w), ANTONYMS[w].upper(), ()


def _ood_sum_compare(rng: random.Random) -> Example:
    a, b = _nums(rng, 2, 10, 60)
    c = a + b + rng.choice((-1, 1)) * rng.randint(1, 15)
    return _pick(rng, ('Is {a} plus {b} greater than {c}? Answer yes or no.',
                       'Answer yes or no: is the sum of {a} and {b} larger than {c}?'),
                 a=a, b=b, c=c), "yes" if a + b > c else "no", ("yes", "no")


# ----------------------------------------------------------------- the tables
@dataclass(frozen=True)
class SyntheticTask:
    """One generated task type.

    ``size`` is the number of examples at scale 1; ``related_to`` names the
    training tasks an OOD task composes (empty for training tasks);
    for OOD tasks ``size`` is the default ``n_per_task``; ``case_insensitive``
    adds the lower-case answer to the references.
    """

    name: str
    skill: str
    size: int
    difficulty: str
    ood: bool
    related_to: tuple[str, ...]
    generate: Generator
    case_insensitive: bool = False


# (name, skill, size, difficulty, generator).  Sizes fall as difficulty rises:
# easy single-step tasks are plentiful, multi-step and lookup tasks are scarce.
_TRAIN_SPECS: tuple[tuple[str, str, int, str, Generator], ...] = (
    ("uppercase", "string", 12000, "easy", _uppercase),
    ("first_letter", "string", 8000, "easy", _first_letter),
    ("copy_text", "string", 6000, "easy", _copy_text),
    ("successor", "arithmetic", 6000, "easy", _successor),
    ("parity", "arithmetic", 5000, "easy", _parity),
    ("last_letter", "string", 5000, "easy", _last_letter),
    ("list_length", "list", 4000, "easy", _list_length),
    ("compare_numbers", "arithmetic", 4000, "easy", _compare_numbers),
    ("yes_no_compare", "logic", 3000, "easy", _yes_no_compare),
    ("list_max", "list", 3000, "medium", _list_max),
    ("reverse_word", "string", 2000, "medium", _reverse_word),
    ("list_min", "list", 2000, "medium", _list_min),
    ("count_letters", "string", 2000, "medium", _count_letters),
    ("repeat_word", "string", 1500, "medium", _repeat_word),
    ("add", "arithmetic", 1500, "medium", _add),
    ("subtract", "arithmetic", 1200, "medium", _subtract),
    ("multiply_small", "arithmetic", 1000, "hard", _multiply_small),
    ("sort_numbers", "list", 700, "hard", _sort_numbers),
    ("count_char", "string", 600, "hard", _count_char),
    ("bool_expr", "logic", 500, "hard", _bool_expr),
    ("add_three", "arithmetic", 400, "hard", _add_three),
    ("antonym_lookup", "lookup", 400, "hard", _antonym_lookup),
    ("capital_lookup", "lookup", 300, "hard", _capital_lookup),
)

# (name, skill, difficulty, related training tasks, generator, case_insensitive)
_OOD_SPECS: tuple[tuple[str, str, str, tuple[str, ...], Generator, bool], ...] = (
    ("reverse_uppercase", "string", "hard", ("reverse_word", "uppercase"),
     _ood_reverse_uppercase, False),
    ("list_sum", "list", "hard", ("add", "add_three"), _ood_list_sum, False),
    ("max_parity", "list", "hard", ("list_max", "parity"), _ood_max_parity, False),
    ("capital_first_letter", "lookup", "hard", ("capital_lookup", "first_letter"),
     _ood_capital_first_letter, True),
    ("longer_word", "string", "hard", ("count_letters", "compare_numbers"),
     _ood_longer_word, False),
    ("antonym_uppercase", "lookup", "hard", ("antonym_lookup", "uppercase"),
     _ood_antonym_uppercase, False),
    ("sum_compare", "arithmetic", "hard", ("add", "yes_no_compare"), _ood_sum_compare, False),
)

TRAIN_TASKS: dict[str, SyntheticTask] = {
    name: SyntheticTask(name, skill, size, diff, False, (), gen)
    for name, skill, size, diff, gen in _TRAIN_SPECS
}
OOD_TASKS: dict[str, SyntheticTask] = {
    name: SyntheticTask(name, skill, 200, diff, True, rel, gen, ci)
    for name, skill, diff, rel, gen, ci in _OOD_SPECS
}


# ------------------------------------------------------------------ generation
def _rng(seed: int, salt: str, name: str) -> random.Random:
    # crc32 rather than hash(): str hashes are salted per process.
    return random.Random((seed << 32) + zlib.crc32(f"{salt}:{name}".encode()))


def _select(tasks: Sequence[str] | None, table: dict[str, SyntheticTask], kind: str,
            ) -> list[SyntheticTask]:
    if tasks is None:
        return list(table.values())
    if isinstance(tasks, str):
        raise RaymixError(f"tasks must be a list of task names, not the string {tasks!r}")
    unknown = [t for t in tasks if t not in table]
    if unknown:
        raise RaymixError(
            f"unknown synthetic {kind} task(s) {', '.join(map(repr, unknown))}; "
            f"valid names: {', '.join(table)}"
        )
    return [table[t] for t in dict.fromkeys(tasks)]  # de-duplicated, order kept


def _check_int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RaymixError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _examples(task: SyntheticTask, n: int, rng: random.Random, split: str) -> list[TaskRecord]:
    seen: set[str] = set()
    out: list[TaskRecord] = []
    for i in range(n):
        for _ in range(_MAX_RETRIES):
            prompt, completion, choices = task.generate(rng)
            if prompt not in seen:
                break
        seen.add(prompt)
        refs: tuple[str, ...] = (completion,)
        if task.case_insensitive and completion.lower() != completion:
            refs = (completion, completion.lower())
        out.append(TaskRecord(task.name, f"{task.name}-{i:06d}", prompt, completion,
                              split, refs, choices))
    return out


def generate_suite(scale: float = 1.0, seed: int = 0, tasks: Sequence[str] | None = None,
                   min_size: int = 20) -> list[TaskRecord]:
    """Generate the training tasks (all with split ``train``; splitting happens later).

    Each task gets ``max(min_size, round(size * scale))`` examples.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
            or not math.isfinite(scale) or scale <= 0:
        raise RaymixError(f"scale must be a positive finite number, got {scale!r}")
    _check_int(seed, "seed", 0)
    _check_int(min_size, "min_size", 1)
    out: list[TaskRecord] = []
    for task in _select(tasks, TRAIN_TASKS, "training"):
        n = max(min_size, round(task.size * scale))
        out.extend(_examples(task, n, _rng(seed, "train", task.name), "train"))
    return out


def generate_ood(n_per_task: int = 200, seed: int = 0,
                 tasks: Sequence[str] | None = None) -> list[TaskRecord]:
    """Generate the held-out OOD tasks (split ``test``, references = accepted answers)."""
    _check_int(n_per_task, "n_per_task", 1)
    _check_int(seed, "seed", 0)
    out: list[TaskRecord] = []
    for task in _select(tasks, OOD_TASKS, "OOD"):
        out.extend(_examples(task, n_per_task, _rng(seed, "ood", task.name), "test"))
    return out


def describe_suite() -> list[dict]:
    """One row per task (training first, then OOD) for reports and the CLI."""
    return [
        {"name": t.name, "skill": t.skill, "size": t.size, "difficulty": t.difficulty,
         "ood": t.ood, "related_to": list(t.related_to)}
        for t in (*TRAIN_TASKS.values(), *OOD_TASKS.values())
    ]
