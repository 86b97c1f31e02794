"""Members' address books from the outside: reading PMS exports and
importing them (the store keeps the entries, ``postvault.store.contacts``)."""
