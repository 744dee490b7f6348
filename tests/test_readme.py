"""The README's commands and paths still work.

Every fenced shell line is read with shlex and checked without running anything heavy:
- `specheads ...` (and `accelerate launch ... train/train.py`, `python train/train.py`,
  `inference/*.py`) parses with the real argument parser, `specheads.cli.build_parser()`;
- `bash scripts/X.sh`, `python scripts/X.py --opt ...`: the file exists, and a Python script's
  `--help` lists every option the README passes it;
- any other program is an error here, so a new kind of command gets a check when it is added.
Inline `specheads <subcommand> --option` spans must name a real subcommand and real options.
Every repository path the README mentions (recipes/, scripts/, docs/, ...) and every relative link
in README.md and docs/*.md must exist. The Library snippet runs on a tiny random model (the real
verifier is patched out); other Python snippets must compile, and their `specheads` imports resolve.
"""

from __future__ import annotations

import ast
import glob
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import specheads
from specheads.cli import build_parser
from specheads.verifier import Verifier

from tiny_text import VOCAB_SIZE, char_tokenizer

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
SHELLS = {"", "bash", "sh", "shell", "console"}
REPO_DIRS = ("recipes", "scripts", "docs", "train", "inference", "tests", "specheads", ".ci")
PATH_RE = re.compile(r"(?<![\w/.~-])((?:%s)/[\w./*-]*)" % "|".join(re.escape(d) for d in REPO_DIRS))
ENTRY_SCRIPTS = {"train/train.py": "train", "inference/generate.py": "generate", "inference/benchmark.py": "bench"}
PYTHONS = {"python", "python3", ".venv/bin/python", "accelerate"}


def fenced_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, text) of every fenced code block."""
    return [(m.group(1).strip().lower(), m.group(2)) for m in re.finditer(r"^```([^\n]*)\n(.*?)^```", path.read_text(), re.S | re.M)]


def shell_commands(path: Path) -> list[list[str]]:
    """Every simple command of the fenced shell blocks, as argv lists (env assignments dropped)."""
    commands = []
    for lang, text in fenced_blocks(path):
        if lang not in SHELLS:
            continue
        pending = ""
        for line in text.replace("\\\n", " ").splitlines():
            try:  # a quoted string may span lines
                tokens = shlex.split(pending + line, comments=True)
            except ValueError:
                pending += line + "\n"
                continue
            pending = ""
            argv: list[str] = []
            for tok in tokens + ["&&"]:
                if tok in ("&&", "||", ";", "|"):
                    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
                        argv.pop(0)
                    if argv:
                        commands.append(argv)
                    argv = []
                else:
                    argv.append(tok)
    return commands


def fill_placeholders(argv: list[str]) -> list[str]:
    return [re.sub(r"<[^>]*>", "x", a) for a in argv]


def parse_specheads(argv: list[str], where: str):
    try:
        return build_parser().parse_args(fill_placeholders(argv))
    except SystemExit as exc:
        pytest.fail(f"{where}: `specheads {' '.join(argv)}` does not parse (exit {exc.code})")


def readme_commands() -> list[list[str]]:
    return shell_commands(README)


def test_readme_has_the_two_commands_ci_runs():
    text = README.read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = "bash scripts/setup.sh && .venv/bin/python -m pytest tests"
    assert test_command in text and test_command in ci, "the README's test command must be the one .ci/run runs"
    assert "bash scripts/setup.sh && .venv/bin/specheads demo" in text
    demo = [c for c in readme_commands() if c[:2] == [".venv/bin/specheads", "demo"]]
    assert demo, "the main-job command is missing"
    args = parse_specheads(demo[0][1:], "main job")
    assert args.kind == "eagle3", "the README's main job is the EAGLE-3 demo"


def test_every_readme_shell_command_is_checked():
    commands = readme_commands()
    assert len(commands) >= 10
    for argv in commands:
        where = f"README command `{' '.join(argv)}`"
        prog = argv[0]
        if prog in ("specheads", ".venv/bin/specheads"):
            parse_specheads(argv[1:], where)
        elif prog == "bash":
            assert (ROOT / argv[1]).is_file(), f"{where}: {argv[1]} does not exist"
        elif prog in PYTHONS:
            check_python_command(argv, where)
        elif prog == "vllm":  # vLLM's own CLI (another venv): serve a hub id, or a folder a README export writes
            assert argv[1] == "serve", where
            exported = {c[-1] for c in commands if c[:2] == ["specheads", "export"]}
            assert argv[2] in exported or re.fullmatch(r"[\w.-]+/[\w.-]+", argv[2]) and not argv[2].startswith("runs"), where
        else:
            pytest.fail(f"{where}: program {prog!r} is not covered by tests/test_readme.py: add a check for it")


def check_python_command(argv: list[str], where: str) -> None:
    if argv[0] == "accelerate":
        assert argv[1] == "launch", where
    if argv[1:3] == ["-m", "pytest"]:
        for target in argv[3:]:
            if not target.startswith("-"):
                assert (ROOT / target).exists(), f"{where}: {target} does not exist"
        return
    scripts = [i for i, a in enumerate(argv) if a.endswith(".py")]
    assert scripts, f"{where}: no script"
    i = scripts[0]
    script, rest = argv[i], argv[i + 1:]
    assert (ROOT / script).is_file(), f"{where}: {script} does not exist"
    if argv[0] == "accelerate":
        opts = argv[2:i]
        for j, a in enumerate(opts):
            if a == "--config_file":
                assert (ROOT / opts[j + 1]).is_file(), f"{where}: {opts[j + 1]} does not exist"
    if script in ENTRY_SCRIPTS:
        parse_specheads([ENTRY_SCRIPTS[script], *rest], where)
    else:
        out = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert out.returncode == 0, f"{where}: {script} --help failed:\n{out.stderr[-2000:]}"
        for a in rest:
            if a.startswith("--"):
                assert a.split("=")[0] in out.stdout, f"{where}: {script} has no option {a}"


def test_entry_scripts_forward_to_the_cli():
    for script in ENTRY_SCRIPTS:
        assert "specheads.cli" in (ROOT / script).read_text(), script


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_specheads_lines_in_fenced_blocks_parse(path):
    """The docs pages' fenced `specheads` lines parse too (their other commands are not run)."""
    for argv in shell_commands(path):
        if argv[0] in ("specheads", ".venv/bin/specheads"):
            parse_specheads(argv[1:], f"{path.name}: `{' '.join(argv)}`")


def subcommand_options() -> dict[str, set[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {name: {s for act in p._actions for s in act.option_strings} for name, p in sub.choices.items()}


def test_inline_specheads_spans_name_real_subcommands_and_options():
    options = subcommand_options()
    spans = re.findall(r"`((?:\.venv/bin/)?specheads [^`]+)`", README.read_text())
    assert spans
    for span in spans:
        tokens = span.split()
        sub = tokens[1]
        if sub.startswith("-"):
            assert sub in ("--help", "-h"), span
            continue
        assert sub in options, f"README `{span}`: no subcommand {sub!r}"
        for tok in tokens[2:]:
            if tok.startswith("--"):
                assert tok.split("=")[0] in options[sub], f"README `{span}`: `specheads {sub}` has no option {tok}"


def test_help_of_every_subcommand_the_readme_uses(capsys):
    used = {c[1] for c in readme_commands() if c[0] in ("specheads", ".venv/bin/specheads")}
    used |= {sub for c in readme_commands() for s, sub in ENTRY_SCRIPTS.items() if s in c}
    assert {"demo", "bench", "train", "export", "generate"} <= used
    for sub in sorted(used):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([sub, "--help"])
        assert exc.value.code == 0
        assert f"usage: specheads {sub}" in capsys.readouterr().out


def test_console_script_help():
    exe = Path(sys.executable).with_name("specheads")
    if not exe.exists():
        pytest.skip("specheads console script not installed next to this python")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for sub in ("generate", "bench", "train", "export", "demo"):
        assert sub in out.stdout


def mentioned_paths(text: str) -> set[str]:
    found = set()
    for m in PATH_RE.finditer(text):
        p = m.group(1).rstrip(".,:;")
        if "..." in p:
            continue
        found.add(p)
    return found


def test_every_repository_path_in_the_readme_exists():
    paths = mentioned_paths(README.read_text())
    for must in ("scripts/setup.sh", "recipes/smollm2_eagle3_quick.yaml", "recipes/accelerate/fsdp.yaml", "docs/eagle3.md"):
        assert must in paths, f"expected the README to mention {must}"
    for p in sorted(paths):
        if any(c in p for c in "*?["):
            assert glob.glob(str(ROOT / p)), f"README path {p} matches nothing"
        else:
            assert (ROOT / p).exists(), f"README mentions {p}, which does not exist"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_exist(path):
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        file = target.split("#")[0]
        assert (path.parent / file).exists(), f"{path.name} links to {target}, which does not exist"


def test_the_demo_recipes_exist():
    from specheads.cli import DEMO_RECIPES

    for recipe in DEMO_RECIPES.values():
        assert (ROOT / recipe).is_file(), recipe
        assert recipe in README.read_text(), f"the README should name the demo recipe {recipe}"


def tiny_verifier() -> Verifier:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    return Verifier(model=LlamaForCausalLM(cfg).eval(), tokenizer=char_tokenizer(), name="tiny-readme")


def python_blocks() -> list[str]:
    return [text for lang, text in fenced_blocks(README) if lang in ("python", "py")]


def imported_roots(tree: ast.AST) -> set[str]:
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    return roots


def test_python_snippets(monkeypatch, capsys):
    blocks = python_blocks()
    assert blocks
    ran = 0
    for text in blocks:
        tree = ast.parse(text)
        roots = imported_roots(tree)
        for node in ast.walk(tree):  # every specheads name a snippet imports exists
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "specheads":
                module = __import__(node.module, fromlist=["_"])
                for alias in node.names:
                    assert hasattr(module, alias.name), f"README imports {alias.name} from {node.module}, which has none"
        if roots == {"specheads"}:
            calls = []

            def fake_load_verifier(name, **kwargs):
                calls.append(name)
                return tiny_verifier()

            monkeypatch.setattr(specheads, "load_verifier", fake_load_verifier)
            exec(compile(tree, "README.md", "exec"), {"__name__": "readme_snippet"})
            assert calls == ["smollm2-135m"]
            ran += 1
    assert ran >= 1, "the Library snippet should run"
    assert capsys.readouterr().out
