"""Stage `download`: the base checkpoint in HuggingFace layout, from the Hub or a seeded random-weight stand-in
(written once into a cache outside the project and hard-linked, as the Hub's own cache is)."""

from __future__ import annotations

import logging

from glm3.pipeline.layout import Layout
from glm3.pipeline.params import ParamsError, StageInputError

log = logging.getLogger("glm3.pipeline")


def run(params: dict, layout: Layout) -> dict:
    p, out = params["download"], layout.outputs["download"]
    if p["source"] == "synthetic":
        from glm3.weights.synthetic import cached_synthetic_checkpoint

        cached_synthetic_checkpoint(out, p["synthetic_preset"], seed=int(p["seed"]), overwrite=True, progress=True)
        summary = {"source": "synthetic", "preset": p["synthetic_preset"], "seed": int(p["seed"])}
    elif p["source"] == "hub":
        from glm3.weights.download import DownloadError, download_from_hub

        try:
            result = download_from_hub(
                out,
                repo_id=p["repo"],
                revision=str(p["revision"]),
                prefer=p["prefer"],
                overwrite=True,
                timeout=float(p["timeout"]),
            )
        except DownloadError as exc:
            raise StageInputError(str(exc)) from exc
        summary = {"source": "hub", "repo": result.repo_id, "commit": result.commit}
    else:
        raise ParamsError(f"download.source must be 'synthetic' or 'hub', got {p['source']!r}")
    log.info("download: %s -> %s", summary, out)
    return summary
