"""Post-training unstructured pruning of causal LMs (no retraining), plain Python (no Prefect).

Modules: ``tiny_model`` (embedded default + ``load_causal_lm``), ``stats`` (activation norms, gradient
scores, sensitivity profile), ``wanda`` (scores, per-row / N:M selection), ``masks`` (apply / exact
rollback / sparsity accounting), ``perplexity``, ``baselines`` (magnitude, uniform Wanda, OWL), ``mcq``
(multiple-choice evaluation), ``session`` (model + data + statistics bundle).
"""
