"""Decisions and glue for the mail Postvault sends about mail: invitations
(with their sign-up links) and new-mail notifications. Building messages
and sending them is ``postvault.outbound``'s job; this package decides who
gets what, and when."""
