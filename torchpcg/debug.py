"""Debug dumps: the split plan, every piece's code and the decompiled bytecode, as files.

In: a ``Runtime`` the backend just built (pieces compiled, nothing captured yet), the Dynamo
GraphModule it came from, and ``PiecewiseConfig.debug_dir``. Out: files under
``debug_dir/graph_<n>/`` (one folder per Dynamo graph) and a ``README.md`` in ``debug_dir`` saying
what each file is. ``install_bytecode_dump`` (called by the backend) adds depyf's decompiled source
of every frame Dynamo transforms; ``depyf_session`` adds depyf's full dump around one block.

A tool above the runtime: imports plan, runtime, split and compilers; the backend and ``stable``
import it, so it never imports them (nor ``explain``).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
import types
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx

from .compilers import LazyCode
from .plan import plan_of
from .runtime import Runtime
from .split import SplitPiece

__all__ = ["dump_split", "depyf_session", "install_bytecode_dump", "inductor_source", "README_TEXT"]

log = logging.getLogger(__name__)

README_TEXT = """\
# torchpcg debug dump

Written because `TORCHPCG_DEBUG_DIR` (or `options={"debug_dir": ...}`) was set.
One `graph_<n>/` folder per Dynamo graph the piecewise backend compiled, numbered in
compile order (a recompile makes a new folder).

| file | what it is |
|---|---|
| `graph_<n>/split_plan.json` | the split plan as data: pieces in execution order (index, name, kind compute/split, number of FX nodes, split reasons, static buffer bytes), split-op counts by category (attention / collective / user / padding-unsafe), buckets, graph mode, token symbol. Same content as `torchpcg.explain(...).to_dict()` for one graph |
| `graph_<n>/split_plan.txt` | the same plan as a readable table (what `print(torchpcg.explain(...))` shows) |
| `graph_<n>/dynamo_graph.py` | the whole FX graph Dynamo handed the backend, before splitting (`print_readable`) |
| `graph_<n>/split_module.py` | the top-level split module: the order in which pieces (`submod_<i>`) are called and which values flow between them |
| `graph_<n>/piece_<i>_<name>.py` | the FX code of piece `<i>`; a header says whether it is a compute piece (compiled, captured per bucket) or a split op (run eagerly on the real rows) and why |
| `graph_<n>/piece_<i>_<name>.inductor.py` | Inductor's generated output code for compute piece `<i>` (only with `compiler="inductor"`), compiled for Dynamo's token count: what every T runs with `backed_compile=0` or when the backed compile was refused. With backed code this compile waits for its first use (a T past the backed code's proven range, T=1 past the exact-shape code's limit) and is not written; T=1's exact-shape code is compiled on its first call, after this dump |
| `graph_<n>/piece_<i>_<name>.backed.inductor.py` | the same piece compiled with T backed, what T = 2 .. the largest bucket run, and larger T as far as its guards are proven (fuses more; see docs/design.md, "Compile") |
| `depyf/__transformed_code_<n>_for_<fn>.py` | depyf's decompiled Python of each frame as Dynamo rewrote it (guards aside: the code that calls the compiled graph); written for every frame Dynamo transforms once the backend has run with `debug_dir` set, when depyf is installed |
| `depyf/` (other files) | `full_code_for_*.py` (guards + transformed code + compiled graph), `__compiled_fn_*.py`: depyf's full dump, written by `torchpcg.debug.depyf_session` when its block wraps the first call (`torchpcg.compile` does) |

Pieces are numbered in execution order; `submod_<k>` names come from `torch.fx.passes.split_module`.
"""


def dump_split(runtime: Runtime, gm: torch.fx.GraphModule, debug_dir: str) -> str:
    """Write the split plan and the code of every piece of ``runtime`` under ``debug_dir/graph_<n>/``.

    Called by the backend after the pieces are compiled and before any call, when ``debug_dir``
    is set. Returns the folder written.

    Example::

        compiled = torch.compile(model, backend="piecewise", options={"debug_dir": "/tmp/pcg"})
        compiled(ids, positions, cache)       # -> /tmp/pcg/README.md, /tmp/pcg/graph_0/...

    Note: it never raises for a write error (a debug aid must not break a compile); failures are
    logged as warnings.
    """
    try:
        folder = _new_graph_dir(debug_dir)
        _write_graph_files(folder, runtime, gm)
    except OSError as exc:
        log.warning("could not write the torchpcg debug dump under %s: %s", debug_dir, exc)
        return ""
    log.info("piecewise debug dump: %s", folder)
    return folder


def _write_graph_files(folder: str, runtime: Runtime, gm: torch.fx.GraphModule) -> None:
    plan = plan_of(runtime)
    _write(os.path.join(folder, "split_plan.json"), json.dumps(plan.to_dict(), indent=2) + "\n")
    _write(os.path.join(folder, "split_plan.txt"), str(plan) + "\n")
    _write(os.path.join(folder, "dynamo_graph.py"), _readable(gm))
    _write(os.path.join(folder, "split_module.py"), runtime.split.split_gm.code)
    runners = {r.name: r for r in runtime.runners}
    for piece in runtime.split.pieces:
        stem = os.path.join(folder, f"piece_{piece.index}_{piece.name}")
        _write(stem + ".py", _piece_header(piece) + _readable(piece.gm))
        compiled = getattr(runners.get(piece.name), "compiled", None)
        # A TokenDispatch holds the backed compile and Dynamo's T (a LazyCode: compiled on first use, maybe not yet).
        other = getattr(compiled, "other", compiled)
        for suffix, code in ((".inductor.py", other.code if isinstance(other, LazyCode) else other),
                             (".backed.inductor.py", getattr(compiled, "backed", None))):
            source = inductor_source(code)
            if source:
                _write(stem + suffix, source)


def _new_graph_dir(debug_dir: str) -> str:
    """A fresh ``graph_<n>`` folder; ``exist_ok=False`` so two writers never share one."""
    os.makedirs(debug_dir, exist_ok=True)
    readme = os.path.join(debug_dir, "README.md")
    if not os.path.exists(readme):
        _write(readme, README_TEXT)
    index = sum(1 for name in os.listdir(debug_dir) if name.startswith("graph_"))
    while True:
        folder = os.path.join(debug_dir, f"graph_{index}")
        try:
            os.makedirs(folder)
            return folder
        except FileExistsError:
            index += 1


def _piece_header(piece: SplitPiece) -> str:
    if piece.is_split_op:
        why = "\n".join(f"#   {r}" for r in piece.reasons)
        return f"# {piece.name} (piece {piece.index}): SPLIT OP, runs eagerly on the real rows. Why:\n{why}\n\n"
    return f"# {piece.name} (piece {piece.index}): COMPUTE piece, compiled and captured per bucket\n\n"


def _readable(gm: torch.fx.GraphModule) -> str:
    try:
        return gm.print_readable(print_output=False)
    except Exception as exc:  # some graph modules (split pieces with odd metadata) cannot print
        log.debug("print_readable failed (%s); dumping gm.code", exc)
        return gm.code


def inductor_source(compiled: Any) -> str:
    """Inductor's generated Python for a piece compiled by ``compile_fx``, or '' if not found.

    ``compile_fx`` returns a wrapper that carries the ``CompiledFxGraph`` attributes, among them
    ``source_code`` (torch 2.13); older versions keep the ``CompiledFxGraph`` in a closure cell.
    """
    seen: set[int] = set()
    todo = [compiled]
    while todo:
        obj = todo.pop()
        if obj is None or id(obj) in seen or len(seen) > 64:
            continue
        seen.add(id(obj))
        source = getattr(obj, "source_code", None)
        if isinstance(source, str) and source:
            return source
        todo.append(getattr(obj, "__wrapped__", None))
        todo.append(getattr(obj, "compiled_fn", None))
        for cell in getattr(obj, "__closure__", None) or ():
            with contextlib.suppress(ValueError):  # an empty cell
                todo.append(cell.cell_contents)
    return ""


def _write(path: str, text: str) -> None:
    """Write atomically: readers (and a second process) never see half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def depyf_session(debug_dir: str | None) -> Iterator[None]:
    """Dump depyf's decompiled bytecode of every frame compiled inside the block to ``debug_dir/depyf``.

    Wrap the first call of a compiled model (compiling happens there):

    Example::

        with torchpcg.debug.depyf_session("/tmp/pcg"):
            compiled(ids, positions, cache)   # -> /tmp/pcg/depyf/full_code_for_forward_*.py, ...

    Note: a no-op when ``debug_dir`` is None; when depyf is not installed it logs one warning and
    does nothing else (``pip install depyf``). depyf writes its files when the block exits.
    """
    if not debug_dir:
        yield
        return
    try:
        import depyf
    except ImportError:
        log.warning("depyf is not installed: no decompiled bytecode in %s (pip install depyf)", debug_dir)
        yield
        return
    target = os.path.join(os.path.abspath(debug_dir), "depyf")
    os.makedirs(target, exist_ok=True)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*debug `torch.compile`.*")  # depyf's own reminder
        dump = depyf.prepare_debug(target)  # depyf's context: it writes on exit
        dump.__enter__()
    try:
        yield
    finally:
        try:
            with _depyf_accepts_callables():
                dump.__exit__(None, None, None)
        except Exception as exc:  # a debug aid must not turn a good run into a failure
            log.warning("depyf could not write its dump to %s: %s", target, exc)
        _remove_lock_files(target)


def _remove_lock_files(folder: str) -> None:
    """depyf leaves one empty ``*.lock`` file per dumped name; they only clutter the dump."""
    for name in os.listdir(folder):
        if name.endswith(".lock"):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))


@contextlib.contextmanager
def _depyf_accepts_callables() -> Iterator[None]:
    """depyf expects a backend to return a function; ours returns a ``Runtime`` object.

    depyf reads the compiled subgraph's ``__code__`` only to name it (it skips decompiling it), so
    for the dump we hand it the code of ``type(obj).__call__``. Scoped to the dump.
    """
    try:
        from depyf.explain.utils import CodeProxy
    except ImportError:  # another depyf layout: let it try as is
        yield
        return
    original = CodeProxy.__dict__["decompile_with_name"]
    plain = original.__func__

    def decompile_with_name(code: Any, name: str, skip_decompile: bool = False) -> Any:
        if not hasattr(code, "co_name") and not hasattr(code, "__code__"):
            call = getattr(type(code), "__call__", None)
            code = getattr(call, "__code__", code)
        return plain(code, name, skip_decompile=skip_decompile)

    CodeProxy.decompile_with_name = staticmethod(decompile_with_name)
    try:
        yield
    finally:
        CodeProxy.decompile_with_name = original


# Dynamo's bytecode hooks are process-wide, so the record of the ones we registered is too:
# directory -> handle, read and written under the lock (two threads may compile at once).
_DUMP_LOCK = threading.Lock()
_DUMP_HANDLES: dict[str, Any] = {}


def install_bytecode_dump(debug_dir: str) -> bool:
    """Write depyf's decompiled source of every frame Dynamo transforms to ``debug_dir/depyf/``.

    The backend calls it when ``debug_dir`` is set, so plain ``torch.compile(model,
    backend="piecewise")`` gets the decompiled code without ``depyf_session``. It registers a
    Dynamo bytecode hook (``torch._dynamo.convert_frame.register_bytecode_hook``, the hook depyf
    uses). Dynamo runs the hooks after the backend has returned, so registering from inside the
    backend still dumps the frame being compiled. Returns True when a hook for ``debug_dir`` is in
    place (installed now or before); idempotent and thread-safe, one hook per directory.

    Example::

        install_bytecode_dump("/tmp/pcg")
        torch.compile(model, backend="piecewise")(ids, positions, cache)
        # -> /tmp/pcg/depyf/__transformed_code_0_for_forward.py

    Files: ``__transformed_code_<n>_for_<fn>.py``, depyf's names (``<n>`` counts the frames of
    ``<fn>``: recompiles, resume functions after a graph break).

    Note: the hook is process-wide and stays until ``remove_bytecode_dump(debug_dir)``: every
    frame Dynamo transforms later is dumped, whatever its backend. It writes the transformed code
    only, not guards or compiled graphs (``depyf_session`` does), and skips frames a
    ``depyf_session`` on the same directory already writes. Without depyf it logs one warning and
    returns False; a decompile or write error is logged, never raised.
    """
    folder = os.path.join(os.path.abspath(debug_dir), "depyf")
    with _DUMP_LOCK:
        if folder in _DUMP_HANDLES:
            return True
        if not _depyf_installed():
            return False
        from torch._dynamo.convert_frame import register_bytecode_hook

        _DUMP_HANDLES[folder] = register_bytecode_hook(_TransformedCodeDump(folder))
    log.info("depyf: decompiled transformed code of each compiled frame goes to %s", folder)
    return True


def remove_bytecode_dump(debug_dir: str) -> None:
    """Unregister the hook ``install_bytecode_dump(debug_dir)`` put in place (no-op if none)."""
    folder = os.path.join(os.path.abspath(debug_dir), "depyf")
    with _DUMP_LOCK:
        handle = _DUMP_HANDLES.pop(folder, None)
    if handle is not None:
        handle.remove()


@functools.lru_cache(maxsize=None)
def _depyf_installed() -> bool:
    """Cached so a missing depyf is logged once per process, not once per compiled graph."""
    try:
        import depyf  # noqa: F401
    except ImportError:
        log.warning("depyf is not installed: the debug dir gets no decompiled bytecode (pip install depyf)")
        return False
    return True


class _TransformedCodeDump:
    """Dynamo bytecode hook ``(original code, transformed code) -> None`` writing the decompiled source."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __call__(self, code: types.CodeType, new_code: types.CodeType) -> None:
        if _depyf_session_writes_to(self.folder):
            return  # depyf's own hook writes the same file for this frame
        try:
            import depyf

            header = (f"# {code.co_name} ({code.co_filename}:{code.co_firstlineno}) as Dynamo transformed it, "
                      "decompiled by depyf; written by torchpcg.debug.install_bytecode_dump\n")
            name = f"__transformed_code_{{}}_for_{_file_safe(code.co_name)}.py"
            path = _write_numbered(self.folder, name, header + depyf.decompile(new_code))
        except Exception as exc:  # depyf cannot decompile every bytecode; a debug aid must not break a compile
            log.warning("depyf could not dump the transformed code of %s to %s: %s", code.co_name, self.folder, exc)
            return
        log.debug("depyf: wrote %s", path)


def _depyf_session_writes_to(folder: str) -> bool:
    """True while a ``depyf_session`` (depyf's ``DebuggableHook``) dumps into ``folder``."""
    from torch._dynamo import convert_frame

    hooks = list(getattr(convert_frame, "_bytecode_hooks", {}).values())
    return any(os.path.abspath(getattr(hook, "dump_src_dir", "")) == folder for hook in hooks)


def _file_safe(name: str) -> str:
    """depyf's rule: '<lambda>', 'A.f' and 'genexpr x' become file-name friendly."""
    for char in ".<> ":
        name = name.replace(char, "_")
    return name


def _write_numbered(folder: str, template: str, text: str) -> str:
    """Write ``text`` to the first free ``template.format(n)``, atomically.

    ``os.link`` fails when the name exists, so two threads or processes never claim the same
    ``n`` and a reader never sees half a file.
    """
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp{os.getpid()}_{threading.get_ident()}")
    _write(tmp, text)
    try:
        index = 0
        while True:
            path = os.path.join(folder, template.format(index))
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                index += 1
    finally:
        os.remove(tmp)
