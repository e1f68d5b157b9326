"""The calculator: the expression model and its Python-exact evaluation
(`expression`), the text grammar (`parser`), the payload encodings
(`codec`: text and the course's pickles), and the server that answers
requests with them (`server`)."""
