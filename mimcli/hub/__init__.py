"""The Hugging Face Hub side of mimcli. Nothing is imported here: import the module you need
(``mimcli.hub.download`` fetches Hub files and plain URLs into the cache)."""
