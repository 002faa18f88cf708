"""The course of exercises (README.md). `python -m exercises NN` runs exercise NN's experiment."""
