"""Showing results: rich tables for the terminal (``tables``), PNG plots (``plots``), the model
card of a pushed encoder (``modelcard``), and the eval metric rows the tables and the card share
(``rows``). Nothing is imported here; import the module you need."""
