"""Onboarding a customer-managed VPC: the vendor's requirements, a check that proves a live VPC
meets them, and a CloudFormation template that builds one that does.

Layers (sans-I/O core, thin I/O shell)::

    requirements   the numbers and names the vendor requires (/16, /24, three /18, tags, 443)
    model          frozen dataclasses: what the check knows about a VPC (fetched facts)
    findings       one result per rule: pass / fail / skip, what was found, how to fix it
    dns            the VPC's private DNS as Route 53 Resolver answers it, over fetched facts
    private_link   what a correct private link is (shared with ``doctor``): pure judgements
    rules          every rule: pure functions from facts to findings
    report         findings as text lines or JSON
    aws            the only module that talks to AWS: read-only Describe/List calls with boto3
                   (imported lazily; boto3 is the optional ``aws`` extra, not needed to run
                   the agent), and the least-privilege IAM policy those calls need
    template       the CloudFormation template (``byoc-agent vpc template``)

Errors (all derive from :class:`agent.core.errors.AgentError`)::

    VpcError                          the check could not run (a finding is not an error)
    ├── AwsUnavailable (ImportError)  boto3 is not installed: ``pip install 'byoc-agent[aws]'``
    ├── AwsAccessError                no credentials, access denied, or the AWS API failed
    └── VpcNotFound (LookupError)     the VPC, security group or endpoint does not exist
    TemplateError (ValueError)        template options that cannot build a compliant VPC
"""
