"""Render what a pipeline needs to run in the cloud: images, templates, workflow, schedule, deploy script.

``gcp_target`` reads the settings from the pipeline config, ``gcp`` writes the bundle, ``flex_main``
and ``step_server`` are the entry points the rendered images run.
"""
