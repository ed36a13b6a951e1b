"""Evaluators, each reporting every nesting dim.

The registry arrives with the evaluation suite.
"""
