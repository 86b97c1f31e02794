"""Online backup and restore of a home folder (issue 7): ``make`` writes a
backup while the server runs, ``restore`` rebuilds a home from one,
``archive`` is the file format and ``openpgp`` the optional encryption."""
