"""The Hugging Face Hub side of mimcli. Nothing is imported here: import the module you need.

``download`` fetches Hub files and plain URLs into the cache. Publishing a refine run:
``repo_folder`` builds the repo offline (``timm_layout`` for the weights and config,
``provenance`` for base model, license and eval columns, ``scrub`` to keep secrets out) and
``upload`` sends it as one commit with retries.
"""
