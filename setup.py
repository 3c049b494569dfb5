#!/usr/bin/env python3
"""Package pacifica-cartd: the Pacifica data cart service."""
from setuptools import setup, find_namespace_packages

with open('README.md', encoding='utf-8') as readme:
    LONG_DESCRIPTION = readme.read()

setup(
    name='pacifica-cartd',
    version='1.0.0.dev0',
    description='Pacifica Cartd: stage files from the Pacifica archive and serve them as one tar',
    long_description=LONG_DESCRIPTION,
    long_description_content_type='text/markdown',
    url='https://github.com/pacifica/pacifica-cartd/',
    license='LGPLv3',
    python_requires='>=3.10',
    packages=find_namespace_packages(include=['pacifica.*']),
    entry_points={
        'console_scripts': [
            'pacifica-cartd=pacifica.cartd.__main__:main',
            'pacifica-cartd-cmd=pacifica.cartd.__main__:cmd',
        ],
    },
    install_requires=[
        'cherrypy>=18.8',
        'cheroot>=11.1,<12',  # httpserver.py builds on cheroot's request and gateway classes (tested: 11.1)
        'peewee>=4.5',
        'celery>=5.3',
        'jsonschema>=4.17',
        'PyYAML>=6.0',
        'tqdm>=4.66',
        'prometheus_client>=0.26',  # metrics.py: multiprocess mode, its value class chosen again (tested: 0.26.0)
    ],
    extras_require={
        'postgres': ['psycopg2-binary>=2.9'],
        'mysql': ['PyMySQL>=1.1'],
        'uwsgi': ['uwsgi>=2.0.23'],
        'test': [
            'pytest>=8.0',
            'requests>=2.31',
            'pytest-xdist>=3.5',
            'pytest-timeout>=2.2',
            'hypothesis>=6.100',
            'psycopg2-binary>=2.9',
            'PyMySQL>=1.1',
            'uwsgi>=2.0.23',
            'pacifica-downloader>=0.4.1',
            'mypy>=1.10',
            'schemathesis>=4.32',
            'ruff>=0.5',
            'setuptools<81',
        ],
    },
)
