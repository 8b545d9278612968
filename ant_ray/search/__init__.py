"""The search: Ray Tune + Optuna over ANT's k / method / clustering, DeMe's p / N / lambda and the merge weights,
by FID at fixed fidelities, chained ant -> deme -> merge and resumable. Nothing here does math."""
