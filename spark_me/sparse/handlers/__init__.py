"""The sparse semantics of torch ops, one small handler per op (registered in `value.HANDLERS`).

What each op means on visible sites (issue 19, SparK's semantics): outputs exist only at visible
sites; convolutions, average pools and upsampling read masked sites as zeros; max pools ignore them;
norm statistics and per-image spatial reductions use visible sites only; elementwise ops act per site
and broadcast with per-image / per-channel tensors. At mask ratio 0 every handler equals the dense op.

- metadata.py: shape, dtype, device queries (answered by the value's metadata);
- pointwise.py: elementwise ops and activations (broadcasts against per-image / per-channel values);
- spatial.py: convolutions and pools (through the engine's dataflows), nearest upsampling;
- norm.py: batch / group / layer norm;
- reduce.py: reductions over the spatial dims (per image) or the channels (per site);
- structure.py: permutes, cat / split / chunk / slicing / channel views, new tensors, casts.
"""

from spark_me.sparse.handlers import metadata, norm, pointwise, reduce, spatial, structure  # noqa: F401
