"""The models of matrix.yaml: its sections, its kernel entries and the whole matrix.

kmatrix.config loads a file into them and turns validation errors into one message.
"""
