"""The paper's MNIST auxiliary-logit experiment: its data, its MLP ensemble, its stages."""
