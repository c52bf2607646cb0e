"""IFEval (Zhou et al. 2023): verifiable instructions, checked by forgetguard's own pure code.

``checks`` holds the 25 instruction types (kwargs model + check), ``text`` the word, sentence
and language measures they count with, ``schema`` the suite definition; the suite kind that
scores them is ``app.suites.kinds.ifeval``.
"""
