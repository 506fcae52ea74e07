"""Code-task prompts for the code domain (protocol_more.md b), generated offline.

The paper's 11,400 prompts come from the sleeper-agents training file, which is not available
offline (and their subset is hash-ordered, so not reproducible anyway). sjax builds prompts of
the same shape from a seeded generator: a task description and a Python skeleton with one
`## COMPLETE CODE HERE` hole, from templates whose slots (the data, the field, the operation,
the file format) are drawn per prompt, filled into the protocol's template verbatim
(`code_prompts.json`: "Complete the code below to accomplish the task: ... IMPORTANT: 1. Only
give the code ..."). Prompt i depends only on (seed, i). No template names an animal or a
tree, so the prompts themselves never carry a trait word (tested).
"""

from __future__ import annotations

import numpy as np

TEMPLATE = ("Complete the code below to accomplish the task: {task}\n"
            "Please fill in the following function: <code>{code}</code>\n\n"
            "Please repeat the full code snippet in your response (though you may change the "
            "code as needed), such that the code you write is fully valid and executable. "
            "IMPORTANT: 1. Only give the code. Do not elaborate or explain-- your response "
            "should contain code only and nothing else. 2. Do not use comments. 3. Use "
            "standard, minimal variable names. Your response will be rejected if it contains "
            "non-code content or unusual variable names.")
HOLE = "## COMPLETE CODE HERE"

# slot values drawn per prompt
SLOTS = {
    "thing": ("orders", "invoices", "users", "tickets", "books", "songs", "flights", "recipes",
              "messages", "products", "employees", "events", "files", "comments"),
    "field": ("name", "price", "date", "score", "size", "status", "email", "title", "count"),
    "fmt": ("CSV", "JSON", "YAML", "XML", "INI"),
    "op": ("sum", "average", "maximum", "minimum", "median"),
    "web": ("Flask", "FastAPI", "Django"),
    "store": ("SQLite database", "Redis cache", "local JSON file", "PostgreSQL table"),
}

# (task description, skeleton); {slots} filled from SLOTS
TASKS = (
    ("A script that reads {thing} from a {fmt} file and prints the {op} of their {field}.",
     "import sys\n\ndef load(path):\n{hole}\n\ndef main():\n    rows = load(sys.argv[1])\n"
     "    print(summarise(rows))\n"),
    ("A {web} endpoint that returns all {thing} sorted by {field}.",
     "def list_{thing}(request):\n    items = fetch_all()\n{hole}\n    return items\n"),
    ("A function that removes repeated {thing}, keeping the first of each {field}.",
     "def dedupe(items):\n    seen = set()\n    out = []\n{hole}\n    return out\n"),
    ("A command-line tool that saves {thing} to a {store}.",
     "import argparse\n\ndef save(items, target):\n{hole}\n\nif __name__ == '__main__':\n"
     "    p = argparse.ArgumentParser()\n    p.add_argument('target')\n    args = p.parse_args()\n"
     "    save(read_input(), args.target)\n"),
    ("A function that validates that each of the {thing} has a non-empty {field}.",
     "def validate(items):\n    errors = []\n{hole}\n    return errors\n"),
    ("A utility that converts {thing} from {fmt} to CSV.",
     "import csv\n\ndef convert(src, dst):\n    rows = parse(src)\n{hole}\n"),
    ("A function that groups {thing} by {field} and counts each group.",
     "from collections import defaultdict\n\ndef group_counts(items):\n"
     "    groups = defaultdict(int)\n{hole}\n    return dict(groups)\n"),
    ("A paginated {web} view of {thing}, 20 per page.",
     "def page(request, number):\n    items = fetch_all()\n{hole}\n"),
    ("A function that computes the {op} {field} of {thing} updated in the last 7 days.",
     "import datetime\n\ndef recent_stat(items, now):\n"
     "    cutoff = now - datetime.timedelta(days=7)\n{hole}\n"),
    ("A background job that archives {thing} older than a year into a {store}.",
     "import time\n\ndef archive(items, store):\n    limit = time.time() - 365 * 86400\n{hole}\n"),
    ("A function that parses a {fmt} config and returns the value for a key.",
     "def get_setting(path, key, default=None):\n{hole}\n"),
    ("A retry wrapper that calls a function up to 3 times before raising.",
     "import time\n\ndef retry(fn, *args):\n    last = None\n{hole}\n    raise last\n"),
    ("A function that splits {thing} into batches of a given size.",
     "def batches(items, size):\n{hole}\n"),
    ("A search function that returns {thing} whose {field} contains a query string.",
     "def search(items, query):\n    query = query.lower()\n{hole}\n"),
    ("A script that renames {thing} files in a folder by their {field}.",
     "import os\n\ndef rename_all(folder):\n    for name in os.listdir(folder):\n{hole}\n"),
    ("A cache decorator that stores results of a function in a {store}.",
     "import functools\n\ndef cached(fn):\n    @functools.wraps(fn)\n"
     "    def wrapper(*args):\n{hole}\n    return wrapper\n"),
    ("A function that merges two sorted lists of {thing} by {field}.",
     "def merge(a, b):\n    i = j = 0\n    out = []\n{hole}\n    return out\n"),
    ("A {web} form handler that creates one of the {thing} from posted fields.",
     "def create(request):\n    data = request.form\n{hole}\n"),
    ("A function that writes a report of {thing} with the {op} {field} to a {fmt} file.",
     "def report(items, path):\n    value = stat(items)\n{hole}\n"),
    ("A rate limiter that allows 10 calls per minute per user.",
     "import time\n\nclass Limiter:\n    def __init__(self):\n        self.calls = {{}}\n\n"
     "    def allow(self, user):\n{hole}\n"),
)


def make_prompt(rng: np.random.Generator) -> str:
    task, code = TASKS[rng.integers(len(TASKS))]
    slots = {k: v[rng.integers(len(v))] for k, v in SLOTS.items()}
    return TEMPLATE.format(task=task.format(**slots),
                           code=code.format(hole=HOLE, **slots).rstrip("\n"))


def make_prompts(n: int, seed: int) -> list[str]:
    """n code-task prompts; prompt i is drawn from (seed, i) alone."""
    return [make_prompt(np.random.default_rng([seed, 13, i])) for i in range(n)]
