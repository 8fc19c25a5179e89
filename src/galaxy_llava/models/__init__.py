"""Models: the family interface (``base``), each family (``llava``), the folders we write around
Hugging Face weights (``folders``), loading (``loading``), adapting (``adapt``) and saving/export
(``runs``)."""
