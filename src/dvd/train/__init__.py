"""Training jobs: ``clip`` (ΔCLIP, clean CLIP, TeCoA, FARE) and ``vlm`` on the shared ``loop``.

``dvd.train.loop`` holds the parts every trainer wires together (distributed setup, autocast,
schedule, non-finite guard, atomic checkpoints, data position, logging, :func:`~dvd.train.loop.fit`);
the job modules are imported lazily by the ``dvd`` CLI.
"""
