"""The command lines behind ``tools/``: each module's ``main(argv)`` is one script, and its
functions are the library the script is a thin front for."""
