"""The back-end: the emitter that streams the weights through the plan into the artifact directory (``emit``), the
SRAM images (``sram_image``), the report (``report``), RTL bank images (``romformats``) and atomic output
(``atomic``). It takes the plan as data and never imports the passes."""
