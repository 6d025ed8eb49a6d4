"""What the examples, benchmarks and tests share that the runtime package does not need: offline loaders of the
two small real models and their sample text (models.py). Installed with sparsify (pyproject includes
"sparsify*"), never imported by it: `import sparsify` stays free of model loading."""
