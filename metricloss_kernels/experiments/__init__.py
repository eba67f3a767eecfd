"""Applications built on the library, not part of its API: the demo, the tournament (protocol, training, report),
the papers' claims, the benchmark grid (bench, harness, plots), the small datasets and the zoo of losses by name.
Nothing in the library imports from here; tqdm, matplotlib and scikit-learn's datasets are needed only here."""
