"""The operator console's shared parts (Streamlit): the engine resource every session shares
(``resources``), cached reads of the SQL aggregates (``reads``), form checks (``forms``),
the doctor (``doctor``) and small view helpers (``views``).

Pages in ``pages/`` and the home page in ``app.py`` are thin ``main()`` functions composed
from these. Only this package and the pages import streamlit; ``engine/``, ``storage/`` and
``fetchers/`` never do.
"""
