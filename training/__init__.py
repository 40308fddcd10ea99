"""Badit training: SuperNI data, routed ability adapters (BAD + DOG), training loop and evaluation."""
