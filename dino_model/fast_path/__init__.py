"""Every run proves its fast path on its own first batch before it trusts it, records the proof, and falls back.

On CUDA the defaults turn on paths the reference does not have: nvjpeg decode + batched multi-crop on the device
(``data.augment_on=auto``), a compiled bf16 step with fused AdamW (``train.compile=auto``), CUDA graphs on request,
bf16 feature extraction. If one is subtly wrong on some GPU / driver / torch combination, the checks here catch it
before the run has spent anything on it:

* :mod:`.data_canary`: the device data path's crops against the CPU workers' crops (same samples, same drawn
  parameters), in uint8 levels; on failure the workers augment for the rest of the run.
* :mod:`.step_canary`: one step of the fast path against the fp32 eager step, on copies of the model, from the
  run's state; on failure (or an exception while compiling / capturing graphs) the eager step in the same autocast
  dtype if that passes, else the fp32 eager reference. :class:`.training.FirstStepsGuard` does the same for an
  exception during the run's first steps.
* :mod:`.extract_canary`: bf16 features against fp32 (cosine similarity per sample); on failure fp32.

``train.fast_path_check`` (and the extraction's ``fast_path_check``): ``fallback`` (default), ``strict`` (fail with
exit code 4 / :class:`FastPathError` instead of falling back: benchmarks) or ``off``. Multi-process runs take rank
0's verdict on every rank. Each verdict (:class:`Verdict`: ``verified``, ``fallback: <reason with numbers>``,
``off`` or ``reference``) and its figures go to the run's records: the MLflow tags and params ``fast_path.data`` /
``fast_path.step`` (training) and ``fast_path.extract`` (evaluation), ``DINO_PROGRESS`` lines, the pretraining
summary and the Parquet metadata of extracted features; a fallback is also a WARNING in the log.

Check a configuration's fast paths without training (what ``benchmarks/gpu_session.sh`` runs first)::

    python -m dino_model.fast_path --config run.yaml [section.field=value ...]

Tolerances and what they come from are stated in each canary's module docstring; their cost is in
docs/benchmarks.md. Tests inject faults through ``DINO_FAST_PATH_FAULT`` (:mod:`.faults`).
"""

from .verdict import FALLBACK, MODES, OFF, REFERENCE, VERIFIED, FastPathError, Verdict, on_rank0, settle

__all__ = ["MODES", "VERIFIED", "FALLBACK", "OFF", "REFERENCE", "FastPathError", "Verdict", "on_rank0", "settle"]
