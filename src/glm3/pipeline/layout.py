"""Where each pipeline stage reads and writes.

The DVC layout is fixed (dvc.yaml declares the same paths). A Prefect run gets a keyed layout: every stage
it runs writes to `models/prefect/<stage>-<key>`, the key hashing the stage's params, its
upstream keys, its data files and the library code, so runs with different params never overwrite each
other and a directory that exists is exactly the result of those inputs (Prefect's task cache relies on it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from glm3.pipeline.params import project_path
from glm3.pipeline.stages import ORDER, STAGES

DVC_OUTPUTS = {name: stage.output for name, stage in STAGES.items()}
WORK_DIR = "models/.work"  # resumable state of unfinished stages; never a DVC output
METRICS_DIR = "metrics"  # small files committed to git (dvc metrics/plots read them)


@dataclasses.dataclass(frozen=True)
class Layout:
    root: str  # the project directory: params' relative paths resolve against it
    outputs: dict[str, str]  # stage -> its output directory (absolute)
    metrics_dir: str | None = None  # None: each stage's metrics go into its output directory

    @classmethod
    def dvc(cls, root: str | os.PathLike = ".") -> Layout:
        root = os.path.abspath(root)
        return cls(root, {s: os.path.join(root, p) for s, p in DVC_OUTPUTS.items()}, os.path.join(root, METRICS_DIR))

    @classmethod
    def keyed(cls, root: str | os.PathLike, params: dict, stages: tuple[str, ...] | list[str]) -> Layout:
        """`stages` get keyed directories; what they read from other stages comes from the DVC layout."""
        unknown = sorted(set(stages) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(ORDER)}")
        base = cls.dvc(root)
        keys: dict[str, str] = {}
        outputs = dict(base.outputs)
        for stage in ORDER:
            sections, upstream, data_keys = STAGES[stage].sections, STAGES[stage].upstream, STAGES[stage].data_keys
            if stage in stages:
                material = {
                    "stage": stage,
                    "code": code_fingerprint(stage, base.root),
                    "params": {s: params[s] for s in sections},
                    "upstream": {u: keys[u] for u in upstream},
                    "data": {k: tree_fingerprint(project_path(base.root, _lookup(params, k))) for k in data_keys},
                }
                keys[stage] = _digest(material)
                outputs[stage] = os.path.join(base.root, "models", "prefect", f"{stage}-{keys[stage]}")
            elif any(stage in STAGES[s].upstream for s in stages):  # an input made outside this run
                keys[stage] = tree_fingerprint(base.outputs[stage])
        return cls(base.root, outputs)

    @property
    def work(self) -> str:
        return os.path.join(self.root, WORK_DIR)

    def metrics(self, stage: str, filename: str) -> str:
        return os.path.join(self.metrics_dir or self.outputs[stage], filename)


def _lookup(params: dict, dotted: str):
    section, key = dotted.split(".")
    return params[section][key]


def _digest(material) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:12]


def tree_fingerprint(path: str) -> str:
    """A cheap identity of a file or directory tree: relative names, sizes and modification times."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; run the stage that makes it first (dvc repro)")
    entries = []
    if os.path.isfile(path):
        st = os.stat(path)
        entries.append((os.path.basename(path), st.st_size, st.st_mtime_ns))
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            st = os.stat(full)
            entries.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    return _digest(entries)


def code_fingerprint(stage: str, root: str) -> str:
    """Hash of the code stage `stage` runs (the files DVC lists as its deps): a code change invalidates that
    stage's keyed results and its successors', as in DVC."""
    from glm3.pipeline.code_deps import stage_code

    h = hashlib.sha256()
    for rel in stage_code(stage, root):
        path = os.path.join(root, rel)
        files = (
            [path]
            if os.path.isfile(path)
            else sorted(os.path.join(d, f) for d, dirs, names in os.walk(path) for f in names if "__pycache__" not in d)
        )
        for full in files:
            h.update(os.path.relpath(full, root).encode())
            with open(full, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:12]
