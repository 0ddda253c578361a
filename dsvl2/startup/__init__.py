"""What brings the service up around the engine: the checkpoint download, the read-ahead of files, the compiler's
start-up settings and the compile bundles. Imported before torch by predict.py (``prefetch``): keep it light."""
