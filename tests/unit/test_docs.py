"""The user docs (README.md, docs/*.md) stay true to the repository: every relative link and image
resolves (anchors included), and every config key or option they name in inline code exists in
the composed config. In-process, no subprocess: the config is composed with Hydra's compose API.

Only inline code spans are read for keys: fenced blocks hold real output, whose error lines name
wrong keys on purpose (`trainer.max_step=5`)."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.resources
import re
from pathlib import Path

import pytest
from omegaconf.errors import MissingMandatoryValue

from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# The config groups whose keys the docs name as `group.key` (hydra.* is Hydra's own, excluded).
GROUPS = ("trainer", "data", "parallel", "optim", "lr_scaling", "schedule", "logger", "loss",
          "metrics", "model")
TOP_LEVEL = ("accum", "effective_batch_size", "seed", "dry_run", "optimized_metric")
# Groups that only select options (`debug=fast`): their options are checked, they have no keys.
SELECT_ONLY = ("debug", "experiment", "hparams_search")

# Keys the docs name that no schema holds, on purpose. Keep it short, and say why.
# (Keys with `+`, `hydra.*` and file names such as `trainer.py` are not read as keys at all.)
ALLOWED_KEYS: set[str] = set()

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)", re.DOTALL)
# `trainer.max_steps`, not `stepwise.data.digits`, `val/loss`, `+model.dropout` or `trainer.py`
KEY = re.compile(r"(?<![\w./$+~-])(" + "|".join(GROUPS) + r")((?:\.[A-Za-z_]\w*)+)"
                 r"(?<!\.py)(?<!\.yaml)(?<!\.md)(?!\w)")
# `name=value` at the start of an override: a group's option, or a top-level key's value
ASSIGN = re.compile(r"(?:^|(?<=\s))([A-Za-z_]\w*)=([^\s`]*)")


def _prose(path: Path) -> str:
    """The file's text outside fenced code blocks (fenced lines become blank lines)."""
    out, fenced = [], False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return "\n".join(out)


def _paragraphs(path: Path) -> list[str]:
    return re.split(r"\n\s*\n", _prose(path))


def _code_spans(path: Path) -> list[str]:
    """Inline code spans, a span broken over lines joined, table pipes unescaped."""
    return [" ".join(m.group(2).replace("\\|", "|").split())
            for para in _paragraphs(path) for m in CODE_SPAN.finditer(para)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.strip().lower().replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in _prose(path).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            result.add(base if n == 0 else f"{base}-{n}")
    return frozenset(result)


def broken_links(path: Path) -> list[str]:
    broken = []
    for para in _paragraphs(path):
        text = CODE_SPAN.sub("", para)  # a link inside inline code is no link
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                broken.append(f"{target}: no such file {dest}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    return broken


def conf_dir():
    """The packaged config directory (stepwise.conf; the source tree's before it is a package)."""
    try:
        return importlib.resources.files("stepwise.conf")
    except (ModuleNotFoundError, TypeError):
        from stepwise.main import CONF_DIR
        return Path(CONF_DIR)


@functools.cache
def options(group: str) -> tuple[str, ...]:
    folder = conf_dir().joinpath(*group.split("/"))
    return tuple(sorted(f.name[:-len(".yaml")] for f in folder.iterdir()
                        if f.is_file() and f.name.endswith(".yaml")))


# The user packages the docs use as examples: their options (`experiment=parity`) exist too.
USER_CONF = (ROOT / "examples" / "parity" / "parity" / "conf",
             ROOT / "tests" / "fixtures" / "userpkg" / "conf")


def user_options(group: str) -> set[str]:
    return {f.stem for conf in USER_CONF for f in (conf / group).glob("*.yaml")}


@functools.cache
def composed(*overrides: str):
    """compose_config(overrides); a value the option leaves mandatory (data=dataset's train) is
    set to null so that the option's other keys can be looked at."""
    extra: list[str] = []
    for _ in range(5):
        try:
            return compose_config(*overrides, *extra)
        except MissingMandatoryValue as e:
            extra.append(f"{e.full_key}=null")
    raise AssertionError(f"cannot compose {overrides}: mandatory values {extra}")


def _has(node, parts: list[str]) -> bool:
    for part in parts:
        if dataclasses.is_dataclass(node):
            if part not in {f.name for f in dataclasses.fields(node)}:
                return False
            node = getattr(node, part)
        elif isinstance(node, dict):
            if part not in node:
                return False
            node = node[part]
        else:  # a scalar, a list or None: nothing below it
            return False
    return True


def key_exists(key: str) -> bool:
    """`group.key[.sub...]` exists in the composed config of the default or of one option of its
    group."""
    group, *parts = key.split(".")
    if _has(getattr(composed(), group), parts):
        return True
    # Options whose YAML names the key are composed first (each composition takes ~0.1 s);
    # the others too, since a schema's defaults hold keys that no YAML file names.
    folder = conf_dir().joinpath(group)
    likely = sorted(options(group), key=lambda option: not re.search(
        rf"\b{parts[0]}\b", folder.joinpath(f"{option}.yaml").read_text()))
    return any(_has(getattr(composed(f"{group}={option}"), group), parts) for option in likely)


def _is_module(name: str) -> bool:
    """`parallel.fsdp.gradient_sync` names code (stepwise.parallel.fsdp), not a config key."""
    import importlib.util

    module = "stepwise." + ".".join(name.split(".")[:2])
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def doc_keys(path: Path) -> list[str]:
    keys = {m.group(1) + m.group(2) for span in _code_spans(path) for m in KEY.finditer(span)}
    return sorted(key for key in keys if not _is_module(key))


def doc_selections(path: Path) -> list[tuple[str, str]]:
    """(name, value) of each `name=value` override at the start of a word in inline code."""
    return sorted({(m.group(1), m.group(2)) for span in _code_spans(path)
                   for m in ASSIGN.finditer(span)})


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", DOCS, ids=_id)
def test_relative_links_resolve(path: Path):
    broken = broken_links(path)
    assert not broken, f"{_id(path)}: " + "; ".join(broken)


@pytest.mark.parametrize("path", DOCS, ids=_id)
def test_config_keys_exist(path: Path):
    missing = [k for k in doc_keys(path) if k not in ALLOWED_KEYS and not key_exists(k)]
    assert not missing, f"{_id(path)} names keys that no option of their group has: {missing}"


@pytest.mark.parametrize("path", DOCS, ids=_id)
def test_options_and_top_level_keys_exist(path: Path):
    """`parallel=ddp|fsdp`: each option is a YAML file of its group; `accum=8`: a top-level key
    of that name exists; a name that is neither but close to one (`acum=8`) is a misspelling."""
    known = (*GROUPS, *SELECT_ONLY, *TOP_LEVEL)
    wrong = []
    for name, value in doc_selections(path):
        if name in GROUPS or name in SELECT_ONLY:
            for option in value.split("|"):
                if re.fullmatch(r"\w+", option) and option != "null" and \
                        option not in options(name) and option not in user_options(name):
                    wrong.append(f"{name}={option}: no {name}/{option}.yaml")
        elif name in TOP_LEVEL:
            if not hasattr(composed(), name):
                wrong.append(f"{name}: not a top-level key")
        elif close := difflib.get_close_matches(name, known, n=1, cutoff=0.8):
            wrong.append(f"{name}={value}: no such key or group; did you mean {close[0]}?")
    assert not wrong, f"{_id(path)}: " + "; ".join(wrong)


def test_top_level_keys_exist():
    cfg = composed()
    assert [k for k in TOP_LEVEL if not hasattr(cfg, k)] == []


def test_the_checks_see_the_docs():
    """Guards the parsers: the docs do name keys, options and anchored links."""
    assert sum(len(doc_keys(p)) for p in DOCS) > 100
    assert ("parallel", "ddp") in doc_selections(ROOT / "README.md")
    assert slug("## Your own project: model, data, loss and metrics by `_target_`".lstrip("# ")) \
        == "your-own-project-model-data-loss-and-metrics-by-_target_"
    assert any("#" in t for p in DOCS for t in LINK.findall(p.read_text()))


FILE_MARK = re.compile(r"^<!-- file: (\S+) -->\s*$")


def quoted_files(path: Path) -> list[tuple[str, str]]:
    """(file, block) for each fenced block that a `<!-- file: <path> -->` line announces."""
    lines, quoted = path.read_text().splitlines(), []
    for i, line in enumerate(lines):
        if (mark := FILE_MARK.match(line)) and i + 1 < len(lines) and FENCE.match(lines[i + 1]):
            end = next(j for j in range(i + 2, len(lines)) if FENCE.match(lines[j]))
            quoted.append((mark.group(1), "\n".join(lines[i + 2:end]) + "\n"))
    return quoted


@pytest.mark.parametrize("path", DOCS, ids=_id)
def test_quoted_files_are_quoted_as_they_are(path: Path):
    """A block announced as a file of the repository (docs/your-project.md walks through
    examples/parity) is that file, or an unchanged excerpt of it."""
    changed = [name for name, block in quoted_files(path)
               if block not in (ROOT / name).read_text()]
    assert not changed, f"{_id(path)} quotes these files other than they are: {changed}"


def test_the_walkthrough_quotes_every_config_file_of_the_example():
    quoted = {name for name, _ in quoted_files(ROOT / "docs" / "your-project.md")}
    example = ROOT / "examples" / "parity"
    files = {str(p.relative_to(ROOT)) for p in example.rglob("*.yaml")}
    assert len(files) == 5 and files <= quoted, sorted(files - quoted)
    assert len(quoted) >= 10
