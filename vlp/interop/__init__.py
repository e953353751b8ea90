"""Weights of other frameworks in and out of vlp (`vlp import`)."""
