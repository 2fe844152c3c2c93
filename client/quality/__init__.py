"""Quality reports on exported models: perplexity on a text (`perplexity`)."""
