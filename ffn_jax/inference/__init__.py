"""FFN inference, following the data:

- ``job.InferenceJob``: opened once per process (checkpoint, image and its normalization, flood
  settings, conv route, the jitted ``predict.Predictor``); ``InferenceJob.segment(bbox,
  workdir)`` is the one way a block is segmented: by ``runner.run`` (``infer.py`` on one box),
  by each tile of ``tiled.run`` (``infer.py`` with ``tile_size_zyx``), and by the training
  loop's segmentation eval;
- ``canvas.Canvas`` floods segments (host numpy) from ``seed`` positions with ``movement``'s
  face-max policy, one ``segment.Segment`` per object in flight, ``canvas_state`` its resumable
  state;
- ``settings`` (config -> options, bbox, route, seeds), ``padding`` (the canvas around a block),
  ``resume`` (job identity, state files), ``outputs`` (what a block writes), ``progress``
  (lines and ETAs), ``tiling`` (pure tile plans and stitching rules), ``preview``.
"""
