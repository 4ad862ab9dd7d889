"""Checks shared by the command-line tests (the ``hexjax`` fixture itself is in ``conftest.py``)."""


def refused(result, *words):
    """Exit 2 with one ``error:`` message holding every word, and no traceback."""
    code, out, err = result
    assert code == 2, (code, out, err)
    assert err.startswith("error: ") and "Traceback" not in err + out, err
    assert err.count("error:") == 1 and err.endswith("\n") and "\n" not in err.rstrip("\n"), err
    for w in words:
        assert w in err, (w, err)
    return err
