from taskvec.cli import app

app()
