"""Stateless tensor functions: each op's plain reference beside one public dispatcher that takes the model's
`Backend` (backend.py) and picks the native kernel (native.py) where the backend, the shapes and the weights'
format (qformat.py) allow it; the tests compare each route with its reference."""
