from specformer_deploy.cli import app

app(prog_name="specformer-deploy")
