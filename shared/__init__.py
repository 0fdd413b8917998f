"""What the API and the workers must agree on: catalog, schemas, settings, keys, job states."""
