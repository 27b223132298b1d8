"""Thin trainer: methods, data, kNN eval, loop"""
