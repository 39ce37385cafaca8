"""Trainer side of ulmfit-operator: what runs inside a training pod or a local subprocess."""
