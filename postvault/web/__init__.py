"""The HTTPS account pages (issue 6 item 3): sign-up from an invitation,
log in/out, account and mailbox settings, password, contacts, office
attachment settings, mail-program setup, and the autoconfig/autodiscover
files mail programs fetch. They never show a message: reading mail is the
mail program's job."""
