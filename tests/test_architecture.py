"""The layout's promises: old run folders still resume after the package moves (a run folder written before the
move, checked in as a fixture), and every shipped config builds."""
from __future__ import annotations

import shutil

import torch

import main as main_module
from conftest import REPO
from helpers import make_folder

SAVED_RUN = REPO / "tests" / "fixtures" / "saved-run"


def test_a_run_folder_saved_before_the_move_resumes(tmp_path):
    """A tiny LoRA run of 2 steps, written by main.py before ldm/ was grouped by job: its saved config names the
    old targets (ldm.lr_scheduler, ldm.callbacks, ldm.webui.progress, ...), its checkpoint holds Lightning's
    loop, callback and optimizer states. ``-r`` continues it to step 4 (photos given again: the saved paths were
    the writing machine's)."""
    run = tmp_path / "logs" / "2026-12-03T14-10-08_saved_run"
    shutil.copytree(SAVED_RUN, run)
    saved = (run / "configs" / "2026-12-03T14-10-08-project.yaml").read_text()
    for target in ("ldm.models.diffusion.ddpm.LatentDiffusion", "ldm.lr_scheduler.LambdaLinearScheduler",
                   "ldm.callbacks.ImageLogger", "ldm.webui.progress.LiveProgress",
                   "ldm.data.dreambooth.DreamBoothDataModule", "ldm.modules.encoders.modules.FrozenCLIPEmbedder"):
        assert f"target: {target}\n" in saved
    subject = make_folder(tmp_path / "subject", 3)
    reg = make_folder(tmp_path / "reg", 3, offset=50)
    assert main_module.main(["-r", str(run), "--data_root", str(subject), "--reg_data_root", str(reg),
                             "--max_steps", "4"]) == 0
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 4 and resumed["batches_trained"] == 4
    before = torch.load(SAVED_RUN / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    lora = [k for k in before if "lora_" in k]
    assert lora and any(not torch.equal(before[k], resumed["state_dict"][k]) for k in lora)  # it trained on
    frozen = [k for k in before if k.startswith("first_stage_model.")]
    assert all(torch.equal(before[k], resumed["state_dict"][k]) for k in frozen)


# ---- layering --------------------------------------------------------------------------------------------------

import ast  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

#: ldm/'s layers, lowest first: a module may import its own layer and those below, never one above. A family's
#: folder (ldm/families/<name>/) holds its record (the folder's __init__) in the families layer and each other
#: part in the layer its name says: modules/ (networks), model.py, sampling.py, diffusers.py (README, "Layout").
LAYERS = [
    ("core", r"ldm|ldm\.(util|files|images|config)|ldm\.reference"),
    ("families", r"ldm\.families(\.\w+)?"),
    ("modules", r"ldm\.modules(\..+)?|ldm\.families\.\w+\.modules(\..+)?"),
    ("data", r"ldm\.data(\..+)?"),
    ("optim", r"ldm\.optim(\..+)?"),
    ("weights", r"ldm\.weights(\..+)?"),
    ("models", r"ldm\.models(\..+)?|ldm\.families\.\w+\.model"),
    ("sampling", r"ldm\.sampling(\..+)?|ldm\.families\.\w+\.sampling"),
    ("export", r"ldm\.export(\..+)?|ldm\.families\.\w+\.diffusers"),
    ("eval", r"ldm\.eval(\..+)?"),
    ("training", r"ldm\.training(\..+)?"),
    ("webui", r"ldm\.webui(\..+)?"),
]
RANK = {name: rank for rank, (name, _) in enumerate(LAYERS)}


def layer_of(module: str) -> str:
    matches = [name for name, pattern in LAYERS if re.fullmatch(pattern, module)]
    assert matches, f"{module}: in no layer (add its package to LAYERS and the README's layout)"
    return matches[-1]  # the most specific: a family's export part is in the export layer


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Every ldm module ``path`` imports, at module level or inside functions (``from x import y`` counts as
    ``x.y`` when that is a module, else ``x``)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    root = REPO
    paths = {module_name(p, root): p for p in sorted((root / "ldm").rglob("*.py"))}
    return {name: imports_of(path, name, set(paths)) for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph`` (Tarjan's strongly connected components of more than one module)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_under_ldm_imports_in_a_circle():
    assert cycles(import_graph()) == []


def test_no_module_under_ldm_imports_a_layer_above_its_own():
    upward = [f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)})" for a, deps in import_graph().items()
              for b in sorted(deps) if RANK[layer_of(b)] > RANK[layer_of(a)]]
    assert upward == []


def test_the_layering_checks_can_fail():
    """The two checks above on graphs made to break them."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("ldm.models.diffusion.ddpm") == "models" and layer_of("ldm.families.sdxl.diffusers") == "export"
    assert RANK[layer_of("ldm.training.run")] > RANK[layer_of("ldm.models.diffusion.ddpm")]


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "scripts").glob("*.py") if p.name != "webui.py")
                         + ["../main.py"])
def test_the_command_lines_import_no_web_ui(script):
    """The sampling and training command lines stand on the library, never on the web UI (which runs them)."""
    path = (REPO / "scripts" / script).resolve()
    names = {n.module or "" for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)}
    names |= {a.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import) for a in n.names}
    assert not [n for n in names if n.startswith("ldm.webui")]


@pytest.mark.parametrize("old, new", sorted(__import__("ldm.util").util.MOVED_MODULES.items()))
def test_a_moved_module_is_found_by_its_old_path(old, new):
    """A ``target:`` naming a module by its path from before the regrouping gets the same object as its new path,
    and the old file is gone (no second copy to drift)."""
    import importlib
    import inspect

    from ldm.util import get_obj_from_str
    module = importlib.import_module(new)
    name = next(n for n, obj in vars(module).items() if not n.startswith("_") and getattr(obj, "__module__", "") == new
                and (inspect.isclass(obj) or inspect.isfunction(obj)))
    assert get_obj_from_str(f"{old}.{name}") is get_obj_from_str(f"{new}.{name}")
    assert not (REPO / (old.replace(".", "/") + ".py")).exists()

